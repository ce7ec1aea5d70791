"""Chunked LayerNorm / RMSNorm: whole-sequence input and output, chunk-sized everything else.

torch's norms save what their backward formula needs and that backward makes
several whole-sequence temporaries (on the CPU, RMSNorm's backward is a chain
of elementwise ops, each a ``[s/P, b, h]`` tensor). Here the forward writes
the output chunk by chunk, saves only the input (which the residual stream
keeps alive anyway), and the backward recomputes each chunk's norm under
autograd and writes its input gradient into place, so a norm's backward costs
one ``[s/P, b, h]`` gradient plus chunk-sized scratch. The parameters are
torch's (``weight``, and ``bias`` for LayerNorm), so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fpdt_ext.config import FPDTConfig

Tensor = torch.Tensor


def _norm(x: Tensor, weight: Tensor, bias, eps: float, rms: bool) -> Tensor:
    shape = (x.shape[-1],)
    return F.rms_norm(x, shape, weight, eps) if rms else F.layer_norm(x, shape, weight, bias, eps)


class _ChunkedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, num_chunks):
        out = torch.empty_like(x)
        for x_c, out_c in zip(x.chunk(num_chunks), out.chunk(num_chunks)):
            out_c.copy_(_norm(x_c, weight, bias, eps, rms))
        ctx.save_for_backward(x, weight, bias)
        ctx.eps, ctx.rms, ctx.num_chunks = eps, rms, num_chunks
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        params = [p.detach().requires_grad_() for p in (weight, bias) if p is not None]
        grads = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
        for x_c, dout_c, grad_c in zip(x.chunk(ctx.num_chunks), dout.chunk(ctx.num_chunks),
                                       grad_x.chunk(ctx.num_chunks)):
            with torch.enable_grad():
                leaf = x_c.detach().requires_grad_()
                y = _norm(leaf, params[0], params[1] if bias is not None else None, ctx.eps, ctx.rms)
                g_x, *g_params = torch.autograd.grad(y, [leaf, *params], dout_c)
            grad_c.copy_(g_x)
            for acc, g in zip(grads, g_params):
                acc.add_(g)
        grads = [g.to(p.dtype) for g, p in zip(grads, params)]
        return grad_x, grads[0], grads[1] if bias is not None else None, None, None, None


class _ChunkedNormMixin:
    fpdt_config: FPDTConfig

    def forward(self, x: Tensor) -> Tensor:  # [s/P, b, h]
        num_chunks = self.fpdt_config.num_chunks(x.shape[0] * self.fpdt_config.fpdt_parallel_size)
        if num_chunks == 1 or not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        return _ChunkedNorm.apply(x, self.weight, getattr(self, "bias", None), self.eps,  # None: F.rms_norm's default
                                  isinstance(self, torch.nn.RMSNorm), num_chunks)


class ChunkedLayerNorm(_ChunkedNormMixin, torch.nn.LayerNorm):
    pass


class ChunkedRMSNorm(_ChunkedNormMixin, torch.nn.RMSNorm):
    pass


class FPDTNorm:
    """Drop-in for megatron-core's WrappedTorchNorm (same arguments, same parameters)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, *args, fpdt_config: FPDTConfig, **kwargs):
        kinds = {"LayerNorm": ChunkedLayerNorm, "RMSNorm": ChunkedRMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"FPDT's chunked norm supports {sorted(kinds)}, got --normalization "
                             f"{config.normalization}")
        if config.layernorm_zero_centered_gamma or config.sequence_parallel:
            raise ValueError("FPDT's chunked norm has no zero-centred gamma and no Megatron sequence parallelism")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        norm.fpdt_config = fpdt_config
        return norm
