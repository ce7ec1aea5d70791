"""Chunked MLP: megatron-core's MLP run chunk by chunk, recomputed in backward.

Each chunk goes through megatron-core's own ``MLP.forward`` (GeLU or SwiGLU,
with or without bias, exactly as the baseline) under a non-reentrant
checkpoint, so only the chunk's input is kept and the ``[s/u, b, ffn/tp]``
intermediate exists for one chunk at a time, in forward and in backward. The
parameters are megatron-core's (``linear_fc1``, ``linear_fc2``).

Under full recompute a layer's forward runs twice before its backward: once
without autograd, then again inside the backward (megatron-core's checkpoint),
where the layer's output only roots the backward and its value is never read.
When this layer is checkpointed on its own (``--recompute-method block``, or
``uniform`` with ``--recompute-num-layers 1``), that second pass does not run
the MLP: it returns zeros in the output's place through :class:`_DeferredChunks`,
whose backward runs each chunk's forward and backward, as the checkpoint would.
So the MLP's forward runs twice per step (not three times) under full recompute.

The layer hands its pre-MLP norm to the forward (``input_norm``): each chunk is
normalised inside its checkpoint, so neither the norm's whole-sequence output
nor a separate whole-sequence norm gradient exists; the norm's parameters stay
the layer's ``pre_mlp_layernorm.*``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP
from torch.utils.checkpoint import checkpoint

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.mcore.norm import ChunkedNorm


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (torch >= 2.0)."""
    return torch._C._current_graph_task_id() != -1


class _DeferredChunks(torch.autograd.Function):
    """The output of ``run`` on ``x``, for a forward whose output value nobody reads: zeros
    forward; the backward runs ``run`` chunk by chunk under autograd and backpropagates each
    chunk (parameter gradients accumulate as in a checkpoint's backward)."""

    @staticmethod
    def forward(ctx, x, run, num_chunks):  # x [s/P, b, h]
        ctx.run, ctx.num_chunks = run, num_chunks
        ctx.save_for_backward(x)
        return x.new_zeros(x.shape)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        for x_c, d_c, g_c in zip(x.chunk(ctx.num_chunks), dout.chunk(ctx.num_chunks), grad_x.chunk(ctx.num_chunks)):
            leaf = x_c.detach().requires_grad_()
            with torch.enable_grad():
                out_c, _ = ctx.run(leaf)
            torch.autograd.backward(out_c, d_c)
            g_c.copy_(leaf.grad)
        return grad_x, None, None


class FPDTMLP(MLP):
    def __init__(self, config, submodules, *args, fpdt_config: FPDTConfig, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.fpdt_config = fpdt_config

    def _output_unread(self) -> bool:
        """True in the recompute pass of a layer that megatron-core checkpoints on its own: the
        forward runs inside a backward, with autograd, and the layer's output only roots the
        checkpoint's backward. (With several layers per checkpoint a layer's output feeds the
        next one, so it is computed.)"""
        cfg = self.config
        alone = cfg.recompute_method == "block" or (cfg.recompute_num_layers or 1) == 1
        return (cfg.recompute_granularity == "full" and alone and self.training and torch.is_grad_enabled()
                and _in_backward())

    def forward(self, hidden_states, input_norm=None, per_token_scale=None, **kwargs):  # [s/P, b, h]
        """``input_norm``: the layer's norm for ``hidden_states``, run on each chunk inside its
        checkpoint (None: ``hidden_states`` are already normalised)."""
        if per_token_scale is not None:
            raise ValueError("the chunked FPDT MLP does not take per_token_scale (MoE only)")
        if input_norm is not None and not isinstance(input_norm, ChunkedNorm):
            hidden_states, input_norm = input_norm(hidden_states), None  # a norm the loop cannot run
        norm = None if input_norm is None else input_norm.input_norm()

        def run(chunk):  # [s/(P*u), b, h]
            return MLP.forward(self, chunk if norm is None else norm(chunk))

        num_chunks = self.fpdt_config.local_chunks(hidden_states.shape[0])
        if self._output_unread():
            fc2 = self.linear_fc2
            bias = fc2.bias if getattr(fc2, "skip_bias_add", False) else None  # what MLP.forward returns
            return _DeferredChunks.apply(hidden_states, run, num_chunks), bias
        outputs, bias = [], None
        for chunk in hidden_states.chunk(num_chunks, dim=0):
            out, bias = checkpoint(run, chunk, use_reentrant=False)
            outputs.append(out)
        return torch.cat(outputs, dim=0), bias
