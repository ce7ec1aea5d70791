"""The block-attention adapter: every backend on this machine against float64 math.

GPU backends run in the same tests when a CUDA device is present (marked gpu).
"""

import math

import pytest
import torch

from fpdt_ext.core import kernels

CUDA = torch.cuda.is_available()


def _reference(q, k, v, causal, scale):
    """float64 (out [b, sq, h, d], lse [b, h, sq]) by plain softmax."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu_(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), lse


def _inputs(b, sq, sk, hq, hkv, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype)
    return make(sq, hq), make(sk, hkv), make(sk, hkv), make(sq, hq)


def _cases():
    devices = ["cpu"] + (["cuda"] if CUDA else [])
    for device in devices:
        for name in kernels.BACKENDS:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                if kernels.backend_supports(name, device, dtype, 16):
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    yield pytest.param(name, device, dtype, marks=marks, id=f"{name}-{device}-{str(dtype)[6:]}")


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("backend,device,dtype", list(_cases()))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_block_forward_and_backward(backend, device, dtype, causal, hq, hkv):
    scale = 1 / math.sqrt(16)
    q, k, v, dout = _inputs(2, 24, 24, hq, hkv, 16, dtype, device)
    out, lse = kernels.block_forward(q, k, v, causal=causal, scale=scale, backend=backend)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _reference(*ref_in, causal, scale)
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == kernels.lse_dtype(dtype)
    assert out.shape == q.shape and lse.shape == (2, hq, 24)
    assert (out.double() - ref_out).abs().max() <= tol * ref_out.abs().max()
    assert (lse.double() - ref_lse).abs().max() <= tol * ref_lse.abs().max()
    grads = kernels.block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, backend=backend)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape, name
        err = (g.double() - r).abs().max() / r.abs().max()
        assert err <= tol, f"d{name}: {err:.2e}"


@pytest.mark.parametrize("backend,device,dtype", list(_cases()))
def test_blockwise_backward_with_final_lse_equals_full_backward(backend, device, dtype):
    """Query rows split over KV blocks: block gradients computed with the rows'
    final out/lse sum to the full gradient (what FPDT's backward relies on)."""
    scale = 0.3
    q, k, v, dout = _inputs(1, 16, 48, 2, 1, 16, dtype, device, seed=1)
    out, lse = kernels.block_forward(q, k, v, causal=False, scale=scale, backend=backend)
    full = kernels.block_backward(dout, q, k, v, out, lse, causal=False, scale=scale, backend=backend)
    dq = torch.zeros_like(q, dtype=torch.float64)
    dks, dvs = [], []
    for blk in range(3):
        sl = slice(16 * blk, 16 * (blk + 1))
        bq, bk, bv = kernels.block_backward(dout, q, k[:, sl], v[:, sl], out, lse, causal=False, scale=scale,
                                            backend=backend)
        dq += bq.double()
        dks.append(bk)
        dvs.append(bv)
    tol = TOL[dtype]
    for part, whole in ((dq, full[0]), (torch.cat(dks, 1), full[1]), (torch.cat(dvs, 1), full[2])):
        assert (part.double() - whole.double()).abs().max() <= 4 * tol * whole.double().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.25, 40.0])  # 40: logits of hundreds, lse far from 0
def test_merge_of_blocks_equals_attention_over_all_keys(dtype, scale):
    q, k, v, _ = _inputs(2, 8, 30, 3, 3, 8, dtype, "cpu", seed=2)
    bounds = [0, 7, 19, 30]
    acc_out = acc_lse = None
    for lo, hi in zip(bounds, bounds[1:]):
        out, lse = kernels.block_forward(q, k[:, lo:hi], v[:, lo:hi], causal=False, scale=scale, backend="math")
        if acc_out is None:
            acc_out, acc_lse = out.to(kernels.lse_dtype(dtype)).clone(), lse.clone()
        else:
            kernels.merge_into(acc_out, acc_lse, out, lse)
    ref_out, ref_lse = _reference(q, k, v, False, scale)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(acc_out).all()
    assert (acc_out.double() - ref_out).abs().max() <= tol * ref_out.abs().max()
    assert (acc_lse.double() - ref_lse).abs().max() <= tol * ref_lse.abs().max()


def test_backend_selection():
    assert kernels.select_backend("cpu", torch.float32, 64) == "cpu_flash"
    assert kernels.select_backend("cpu", torch.float32, 64, "math") == "math"
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.select_backend("cpu", torch.float32, 64, "nope")
    with pytest.raises(ValueError, match="does not support"):
        kernels.select_backend("cpu", torch.float32, 64, "cuda_flash")
    assert not kernels.backend_supports("flash_attn", "cpu", torch.bfloat16, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_default_backends():
    assert kernels.select_backend("cuda", torch.bfloat16, 128) in ("flash_attn", "cuda_flash")
    assert kernels.select_backend("cuda", torch.float32, 128) == "cuda_efficient"
