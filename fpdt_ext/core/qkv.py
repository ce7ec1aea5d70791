"""FPDT attention from hidden states: QKV projection and rotary inside the chunk loop.

This is DESIGN.md's data flow: per local chunk i, the layer's input norm
(optional), ``x_i @ W_qkv^T (+ b)``, the split into q/k/v heads, the rotary
embedding, then the all-to-all and the chunked attention of
:mod:`fpdt_ext.core.attention`. No whole-sequence norm output, q, k, v or
``[s/P, b, 3h]`` projection exists in forward or backward; what the backward
keeps besides the attention chunks is the input ``x`` (the layer's input,
which the residual stream keeps alive anyway).

backward, per chunk j as soon as its dq/dk/dv are complete (end of outer step j)
    all-to-all back; sum the KV-head copies; the rotary's adjoint (a rotation by
    the negated angles); join into the projection's layout; recompute the
    chunk's norm output n_j (n_j = x_j without a norm); then
    ``dn_j = dqkv_j @ W``, ``dW += dqkv_j^T n_j`` (``db += sum dqkv_j``) and the
    norm's backward from ``dn_j`` to ``dx_j`` and the norm's parameters.

The projection's output layout is megatron-core's: per KV-head group, that
group's query heads, then its key head, then its value head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fpdt_ext.core import kernels
from fpdt_ext.core.attention import (AttentionPlan, AttentionState, GradSink, backward_chunks, close_state,
                                     forward_chunks, keep_for_backward, make_plan, take_for_backward, unreplicate_kv)
from fpdt_ext.core.config import ChunkPlan
from fpdt_ext.core.norm import ChunkNormGrads, InputNorm, normalize

Tensor = torch.Tensor
Rotary = Callable[[Tensor, Tensor], Tensor]  # (t [c, b, heads, d], angles [c, b|1, 1, rot]) -> rotated t


@dataclasses.dataclass(frozen=True)
class QKVLayout:
    """Head counts of the projection's output (this tensor-parallel rank's share)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def split(self, mixed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """[c, b, width] -> q [c, b, H, d], k and v [c, b, KV, d] (views where possible)."""
        d, group = self.head_dim, self.num_heads // self.num_kv_heads
        grouped = mixed.unflatten(2, (self.num_kv_heads, (group + 2) * d))
        q, k, v = grouped.split([group * d, d, d], dim=3)
        return q.reshape(*q.shape[:2], self.num_heads, d), k, v

    def join(self, dq: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
        """The adjoint of :meth:`split`: -> [c, b, width]."""
        grouped_q = dq.unflatten(2, (self.num_kv_heads, -1)).flatten(3)
        return torch.cat([grouped_q, dk, dv], dim=3).flatten(2)


class _ProjectionGrads(GradSink):
    """Takes each chunk's dq/dk/dv back through the rotary, the QKV projection and the norm."""

    def __init__(self, x, weight, has_bias, freqs, layout: QKVLayout, rotary, kv_rep, num_chunks,
                 norm: Optional[ChunkNormGrads]):
        self.x, self.weight, self.freqs, self.layout, self.rotary = x, weight, freqs, layout, rotary
        self.norm = norm
        self.c, self.kv_rep = x.shape[0] // num_chunks, kv_rep
        self.grad_x = torch.empty_like(x)
        acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate bf16/fp16 weights in fp32
        self.grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        self.grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if has_bias else None
        self.chunks = {}

    def targets(self, i):
        if i not in self.chunks:
            c, b, lay = self.c, self.x.shape[1], self.layout
            self.chunks[i] = (self.x.new_empty(c, b, lay.num_heads, lay.head_dim),
                              self.x.new_empty(c, b, lay.num_kv_heads * self.kv_rep, lay.head_dim),
                              self.x.new_empty(c, b, lay.num_kv_heads * self.kv_rep, lay.head_dim))
        return self.chunks[i]

    def complete(self, i):
        sl = slice(i * self.c, (i + 1) * self.c)
        dq, dk, dv = self.chunks.pop(i)
        kv = self.layout.num_kv_heads
        dk, dv = unreplicate_kv(dk, kv), unreplicate_kv(dv, kv)
        if self.freqs is not None:  # a rotation's adjoint is the rotation by the negated angles
            angles = -self.freqs[sl]
            dq, dk = self.rotary(dq, angles), self.rotary(dk, angles)
        dqkv = self.layout.join(dq, dk, dv).flatten(0, 1)  # [c*b, width]
        if self.norm is None:
            n_i = self.x[sl].flatten(0, 1)  # [c*b, h]
            torch.mm(dqkv, self.weight, out=self.grad_x[sl].view(n_i.shape))
        else:
            leaf, n_i = self.norm.output(self.x[sl])
            dn_i = torch.mm(dqkv, self.weight).view(n_i.shape)
            self.grad_x[sl].copy_(self.norm.backward(leaf, n_i, dn_i))
            n_i = n_i.detach().flatten(0, 1)
        kernels.addmm_fp32(self.grad_w, dqkv.t(), n_i)  # summed over chunks in float32
        if self.grad_b is not None:
            self.grad_b.add_(dqkv.sum(0))

    def result(self):
        grad_b = None if self.grad_b is None else self.grad_b.to(self.weight.dtype)
        return self.grad_x, self.grad_w.to(self.weight.dtype), grad_b


@dataclasses.dataclass(frozen=True)
class QKVStatic:
    """Everything :class:`FPDTQKVAttentionFunction` needs besides its tensors."""

    plan: AttentionPlan
    layout: QKVLayout
    rotary: Optional[Rotary]  # with rotary frequencies
    norm_kind: Optional[Tuple[Optional[float], bool, bool]]  # (eps, rms, zero_centered) of the input norm, if any
    tp_group: Any  # the norm's parameter gradients are summed over it (None: no TP)
    overwrite_grad: bool  # the output's gradient may be used as scratch
    for_backward: bool


class FPDTQKVAttentionFunction(torch.autograd.Function):
    """Tensors in (``freqs`` and the norm's parameters may be None), ``static`` the rest."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, freqs, static: QKVStatic):
        plan, layout = static.plan, static.layout
        s_local, b, _ = x.shape
        c = s_local // plan.num_chunks
        state = AttentionState(plan, x.device, static.for_backward)

        def chunk(i: int):
            sl = slice(i * c, (i + 1) * c)
            n_i = x[sl] if static.norm_kind is None else normalize(x[sl], norm_weight, norm_bias, *static.norm_kind)
            q, k, v = layout.split(F.linear(n_i, weight, bias))
            if freqs is not None:
                q, k = static.rotary(q, freqs[sl]), static.rotary(k, freqs[sl])
            return q, k, v

        out = forward_chunks(chunk, x.new_empty(s_local, b, layout.num_heads, layout.head_dim), plan, state)
        if not static.for_backward:
            close_state(state)
        else:
            ctx.static, ctx.has_bias, ctx.has_freqs = static, bias is not None, freqs is not None
            empty = x.new_empty(0)
            keep_for_backward(ctx, state, x, weight, *(empty if t is None else t for t in (freqs, norm_weight, norm_bias)))
        return out.flatten(2)  # [s/P, b, H*d]

    @staticmethod
    def backward(ctx, dout):
        x, weight, freqs, norm_weight, norm_bias = take_for_backward(ctx)
        static = ctx.static
        plan, layout = static.plan, static.layout
        norm = None
        if static.norm_kind is not None:
            norm = ChunkNormGrads(norm_weight, norm_bias if norm_bias.numel() else None, *static.norm_kind)
        sink = _ProjectionGrads(x, weight, ctx.has_bias, freqs if ctx.has_freqs else None, layout,
                                static.rotary, plan.kv_rep, plan.num_chunks, norm)
        dout = dout.unflatten(2, (layout.num_heads, layout.head_dim)).contiguous()
        backward_chunks(dout, plan, ctx.state, sink, overwrite_dout=static.overwrite_grad)
        close_state(ctx.state)
        grad_norm_weight = grad_norm_bias = None
        if norm is not None:
            grad_norm_weight, grad_norm_bias = norm.result()
            if static.tp_group is not None:  # each TP rank saw its heads' share of the norm's output gradient
                for g in (grad_norm_weight, grad_norm_bias):
                    if g is not None:
                        dist.all_reduce(g, group=static.tp_group)
        grad_x, grad_weight, grad_bias = sink.result()
        return grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, None, None


def fpdt_qkv_attention(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    layout: QKVLayout,
    plan: Optional[ChunkPlan] = None,
    *,
    norm: Optional[InputNorm] = None,
    rotary_freqs: Optional[Tensor] = None,
    rotary: Optional[Rotary] = None,
    tp_group=None,
    overwrite_output_grad: bool = False,
    **plan_kwargs,
) -> Tensor:
    """Causal self-attention of hidden states ``x [s/P, b, h]`` in the FPDT layout.

    ``weight [layout.width, h]`` and ``bias`` are the QKV projection's (this TP
    rank's rows; the caller makes x's gradient all-reduce over TP).
    ``plan``: the chunking, from :meth:`FPDTConfig.plan` (or, for a direct call, the keyword
    arguments of :func:`fpdt_ext.core.attention.make_plan`: ``sp_group``, ``num_chunks``,
    ``offload``, ``offload_dir``; and ``softmax_scale``, ``backend`` in any case).
    ``norm``: the layer's input norm, applied chunk by chunk first; its parameters get
    gradients like the projection's, with TP summed over ``tp_group`` (each rank
    projects its heads).
    ``overwrite_output_grad``: the backward may use the output's gradient as scratch
    (saves one ``[s/P, b, h]`` buffer); only when nothing else reads that gradient, as
    when the output feeds only a linear layer (FPDTSelfAttention's ``linear_proj``).
    ``rotary_freqs [s/P, b|1, 1, rot]`` are the angles at the tokens' global
    positions; ``rotary(t, angles)`` applies them and must be the rotation
    ``t*cos + rotate_half(t)*sin`` (possibly scaled), so that rotating by the
    negated angles is its adjoint. Returns ``[s/P, b, H*d]``.
    """
    s_local, b, _ = x.shape
    if weight.shape != (layout.width, x.shape[2]):
        raise ValueError(f"QKV weight must be [{layout.width}, {x.shape[2]}] for {layout}, "
                         f"got {tuple(weight.shape)}")
    if (rotary_freqs is None) != (rotary is None):
        raise ValueError("pass both rotary_freqs and rotary, or neither")
    shape = lambda heads: torch.empty(s_local, b, heads, layout.head_dim, dtype=x.dtype, device="meta")
    attention_plan = make_plan(shape(layout.num_heads), shape(layout.num_kv_heads), shape(layout.num_kv_heads),
                               plan, device=x.device, **plan_kwargs)
    norm_weight, norm_bias = (None, None) if norm is None else (norm.weight, norm.bias)
    tensors = [t for t in (x, weight, bias, norm_weight, norm_bias) if t is not None]
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    static = QKVStatic(plan=attention_plan, layout=layout, rotary=rotary,
                       norm_kind=None if norm is None else (norm.eps, norm.rms, norm.zero_centered),
                       tp_group=tp_group,
                       overwrite_grad=overwrite_output_grad,
                       for_backward=torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    return FPDTQKVAttentionFunction.apply(x, norm_weight, norm_bias, weight, bias, rotary_freqs, static)
