"""LayerNorm / RMSNorm one chunk at a time: the functions FPDT's loops normalise with.

torch's norms save what their backward formula needs and that backward makes
several whole-sequence temporaries (on the CPU, RMSNorm's backward is a chain
of elementwise ops, each a ``[s/P, b, h]`` tensor). :func:`chunked_norm` writes
the output chunk by chunk, saves only the input (which the residual stream
keeps alive anyway), and its backward recomputes each chunk's norm under
autograd and writes its input gradient into place, so a norm's backward costs
one ``[s/P, b, h]`` gradient plus chunk-sized scratch. :class:`InputNorm` is a
norm's parameters handed to a loop that normalises each chunk itself (the QKV
projection, the MLP); :class:`ChunkNormGrads` is its backward there.

``zero_centered``: Megatron's zero-centred gamma (``--apply-layernorm-1p``): the stored weight
``w`` starts at zero and the norm scales by ``1 + w``; gradients are taken with respect to ``w``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def normalize(x: Tensor, weight: Tensor, bias, eps, rms: bool, zero_centered: bool = False) -> Tensor:
    """LayerNorm (RMSNorm if ``rms``) over the last dim; ``eps=None``: RMSNorm's default;
    ``zero_centered``: scaled by ``1 + weight``."""
    shape = (x.shape[-1],)
    if zero_centered:
        weight = weight + 1
    return F.rms_norm(x, shape, weight, eps) if rms else F.layer_norm(x, shape, weight, bias, eps)


@dataclasses.dataclass(frozen=True)
class InputNorm:
    """A norm applied by the module that follows it: LayerNorm, or RMSNorm if ``rms``
    (``eps=None``: RMSNorm's default)."""

    weight: Tensor
    bias: Optional[Tensor] = None
    eps: Optional[float] = 1e-5
    rms: bool = False
    zero_centered: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        return normalize(x, self.weight, self.bias, self.eps, self.rms, self.zero_centered)


class ChunkNormGrads:
    """A norm's backward one chunk at a time: each chunk's output is recomputed under autograd
    from its input; the parameter gradients are summed over chunks (in float32 for bf16/fp16)."""

    def __init__(self, weight: Tensor, bias, eps, rms: bool, zero_centered: bool = False):
        self.params = [p.detach().requires_grad_() for p in (weight, bias) if p is not None]
        self.grads = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in self.params]
        self.has_bias, self.eps, self.rms, self.zero_centered = bias is not None, eps, rms, zero_centered

    def output(self, x_c: Tensor) -> Tuple[Tensor, Tensor]:
        """(leaf, output): chunk ``x_c``'s norm, recomputed with a graph back to ``leaf``."""
        leaf = x_c.detach().requires_grad_()
        with torch.enable_grad():
            y = normalize(leaf, self.params[0], self.params[1] if self.has_bias else None, self.eps, self.rms,
                          self.zero_centered)
        return leaf, y

    def backward(self, leaf: Tensor, y: Tensor, dy: Tensor) -> Tensor:
        """The chunk's input gradient; its parameter gradients are added to the sums."""
        g_x, *g_params = torch.autograd.grad(y, [leaf, *self.params], dy)
        for acc, g in zip(self.grads, g_params):
            acc.add_(g)
        return g_x

    def result(self) -> Tuple[Tensor, Optional[Tensor]]:
        """(weight gradient, bias gradient or None) in the parameters' dtype."""
        grads = [g.to(p.dtype) for g, p in zip(self.grads, self.params)]
        return grads[0], grads[1] if self.has_bias else None


class _ChunkedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, zero_centered, num_chunks):
        out = torch.empty_like(x)
        for x_c, out_c in zip(x.chunk(num_chunks), out.chunk(num_chunks)):
            out_c.copy_(normalize(x_c, weight, bias, eps, rms, zero_centered))
        ctx.save_for_backward(x, weight, bias)
        ctx.eps, ctx.rms, ctx.zero_centered, ctx.num_chunks = eps, rms, zero_centered, num_chunks
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        norm = ChunkNormGrads(weight, bias, ctx.eps, ctx.rms, ctx.zero_centered)
        for x_c, dout_c, grad_c in zip(x.chunk(ctx.num_chunks), dout.chunk(ctx.num_chunks),
                                       grad_x.chunk(ctx.num_chunks)):
            grad_c.copy_(norm.backward(*norm.output(x_c), dout_c))
        return grad_x, *norm.result(), None, None, None, None


def chunked_norm(x: Tensor, norm: InputNorm, num_chunks: int) -> Tensor:
    """``norm(x)`` for ``x [s, b, h]``, computed and backpropagated ``num_chunks`` chunks at a time."""
    if num_chunks == 1 or not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad)):
        return norm(x)
    return _ChunkedNorm.apply(x, norm.weight, norm.bias, norm.eps, norm.rms, norm.zero_centered, num_chunks)
