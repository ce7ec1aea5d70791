"""Chunked MLP: megatron-core's MLP run chunk by chunk, recomputed in backward.

Each chunk goes through megatron-core's own ``MLP.forward`` (GeLU or SwiGLU,
with or without bias, exactly as the baseline) under a non-reentrant
checkpoint, so only the chunk's input is kept and the ``[s/u, b, ffn/tp]``
intermediate exists for one chunk at a time, in forward and in backward. The
parameters are megatron-core's (``linear_fc1``, ``linear_fc2``).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.mlp import MLP
from torch.utils.checkpoint import checkpoint

from fpdt_ext.config import FPDTConfig


class FPDTMLP(MLP):
    def __init__(self, config, submodules, *args, fpdt_config: FPDTConfig, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.fpdt_config = fpdt_config

    def forward(self, hidden_states, per_token_scale=None, **kwargs):  # [s/P, b, h]
        if per_token_scale is not None:
            raise ValueError("the chunked FPDT MLP does not take per_token_scale (MoE only)")
        num_chunks = self.fpdt_config.num_chunks(hidden_states.shape[0] * self.fpdt_config.fpdt_parallel_size)
        run = functools.partial(MLP.forward, self)
        outputs, bias = [], None
        for chunk in hidden_states.chunk(num_chunks, dim=0):  # [s/(P*u), b, h]
            out, bias = checkpoint(run, chunk, use_reentrant=False)
            outputs.append(out)
        return torch.cat(outputs, dim=0), bias
