"""Chunked MLP: megatron-core's MLP run chunk by chunk, recomputed in backward.

Each chunk goes through megatron-core's own ``MLP.forward`` (GeLU or SwiGLU,
with or without bias, exactly as the baseline). Forward keeps only the MLP's
input: the ``[s/u, b, ffn/tp]`` intermediate exists for one chunk at a time, in
forward and in backward. The parameters are megatron-core's (``linear_fc1``,
``linear_fc2``).

Backward runs each chunk's forward and backward as a backward call of its own
(:class:`_ChunkedRun`), so each chunk's weight gradient reaches megatron-core
DDP's float32 ``main_grad`` separately. (A checkpoint per chunk inside one
backward call would let autograd sum the chunks' weight gradients in the
parameters' dtype first: in bf16 that error grows as the square root of the
chunk count, 2.1x the unchunked MLP's at 32 chunks.) As with a reentrant
checkpoint, the parameters' gradients arrive in ``.grad`` (and DDP's
``main_grad``), not through ``torch.autograd.grad``. Megatron-FSDP's gradient
hooks take one gradient per parameter and backward (with sharded gradients a
second one replaces the first in its reduction bucket), so under it
(``FPDTConfig.param_grads_once``) the chunks' parameter gradients are summed in
float32 and returned once by the chunked run, as the gradients of its inputs.

Under full recompute a layer's forward runs twice before its backward: once
without autograd, then again inside the backward (megatron-core's checkpoint),
where the layer's output only roots the backward and its value is never read.
When this layer is checkpointed on its own (``--recompute-method block``, or
``uniform`` with ``--recompute-num-layers 1``), that second pass does not run
the MLP: it returns zeros in the output's place, and the backward runs each
chunk's forward and backward as always. So the MLP's forward runs twice per
step (not three times) under full recompute.

The layer hands its pre-MLP norm to the forward (``input_norm``): each chunk is
normalised inside the chunk's run, so neither the norm's whole-sequence output
nor a separate whole-sequence norm gradient exists; the norm's parameters stay
the layer's ``pre_mlp_layernorm.*``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.mcore.norm import ChunkedNorm
from fpdt_ext.profiling import MLP_CHUNK_BACKWARD, MLP_CHUNK_FORWARD, phase


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (torch >= 2.0)."""
    return torch._C._current_graph_task_id() != -1


class _ChunkedRun(torch.autograd.Function):
    """``run`` on ``x`` chunk by chunk, keeping only ``x``: forward without autograd (or, with
    ``compute`` False, for a forward whose output nobody reads, zeros without running it);
    backward runs each chunk's forward and backward as its own backward call, so parameter
    gradients accumulate chunk by chunk where the parameters' hooks put them. With ``params``
    (the parameters ``run`` uses) their gradients are summed over the chunks in float32 instead
    and returned once, as the gradients of these inputs."""

    @staticmethod
    def forward(ctx, x, run, num_chunks, compute, *params):  # x [s/P, b, h]
        ctx.run, ctx.num_chunks, ctx.params = run, num_chunks, params
        ctx.save_for_backward(x)
        if not compute:
            return x.new_zeros(x.shape)
        outs = []
        for x_c in x.chunk(num_chunks):
            with phase(MLP_CHUNK_FORWARD):
                outs.append(run(x_c)[0])
        return torch.cat(outs, dim=0)  # [s/P, b, h]

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        params = ctx.params
        sums = [torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                for p in params]
        grad_x = torch.empty_like(x)
        for x_c, d_c, g_c in zip(x.chunk(ctx.num_chunks), dout.chunk(ctx.num_chunks), grad_x.chunk(ctx.num_chunks)):
            with phase(MLP_CHUNK_BACKWARD):
                leaf = x_c.detach().requires_grad_()
                with torch.enable_grad():
                    out_c, _ = ctx.run(leaf)
                if params:
                    g_leaf, *g_params = torch.autograd.grad(out_c, [leaf, *params], d_c, allow_unused=True)
                    for total, g in zip(sums, g_params):
                        if g is not None:
                            total.add_(g)
                    g_c.copy_(g_leaf)
                else:
                    torch.autograd.backward(out_c, d_c)
                    g_c.copy_(leaf.grad)
        return grad_x, None, None, None, *(total.to(p.dtype) for total, p in zip(sums, params))


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
        fc2 = self.linear_fc2
        bias = fc2.bias if getattr(fc2, "skip_bias_add", False) else None  # what MLP.forward returns
        params = ()
        if self.fpdt_config.param_grads_once:
            params = tuple(p for p in self.parameters() if p.requires_grad)
            if norm is not None:
                params += tuple(p for p in (norm.weight, norm.bias) if p is not None and p.requires_grad)
        return _ChunkedRun.apply(hidden_states, run, num_chunks, not self._output_unread(), *params), bias
