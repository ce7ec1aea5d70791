"""Chunked MLP: megatron-core's MLP run chunk by chunk, recomputed in backward.

Each chunk goes through megatron-core's own ``MLP.forward`` (GeLU or SwiGLU,
with or without bias, exactly as the baseline) under a non-reentrant
checkpoint, so only the chunk's input is kept and the ``[s/u, b, ffn/tp]``
intermediate exists for one chunk at a time, in forward and in backward. The
parameters are megatron-core's (``linear_fc1``, ``linear_fc2``).

FPDTGPTModel fuses the layer's pre-MLP norm into it (:meth:`FPDTMLP.fuse_input_norm`):
each chunk is normalised inside its checkpoint, so neither the norm's
whole-sequence output nor a separate whole-sequence norm gradient exists; the
norm's parameters stay ``pre_mlp_layernorm.*``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP
from torch.utils.checkpoint import checkpoint

from fpdt_ext.config import FPDTConfig
from fpdt_ext.norm import fuse_into_next


class FPDTMLP(MLP):
    def __init__(self, config, submodules, *args, fpdt_config: FPDTConfig, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.fpdt_config = fpdt_config
        self._input_norm = ()  # (norm,) once fused; a tuple, so it is not registered a second time

    def fuse_input_norm(self, norm) -> bool:
        """Normalise each chunk with ``norm`` (the layer's ``pre_mlp_layernorm``, a chunked torch
        norm) inside the chunk's checkpoint; the norm module then passes its input through."""
        if not fuse_into_next(norm, self.config):
            return False
        self._input_norm = (norm,)
        return True

    def _run(self, chunk):
        if self._input_norm:
            chunk = self._input_norm[0].as_input_norm()(chunk)
        return MLP.forward(self, chunk)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):  # [s/P, b, h]
        if per_token_scale is not None:
            raise ValueError("the chunked FPDT MLP does not take per_token_scale (MoE only)")
        num_chunks = self.fpdt_config.num_chunks(hidden_states.shape[0] * self.fpdt_config.fpdt_parallel_size)
        outputs, bias = [], None
        for chunk in hidden_states.chunk(num_chunks, dim=0):  # [s/(P*u), b, h]
            out, bias = checkpoint(self._run, chunk, use_reentrant=False)
            outputs.append(out)
        return torch.cat(outputs, dim=0), bias
