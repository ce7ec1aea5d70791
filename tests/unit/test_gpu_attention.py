"""fpdt_attention and the chunked loss on one CUDA device: CUDA kernels, pinned offload with the
side stream, bf16 GEMMs summed in float32.

Skipped without a GPU; run by bench/gpu_check.sh on a lent machine.
"""

import pytest
import torch

from fpdt_ext.core import kernels
from fpdt_ext.core.attention import AttentionState, fpdt_backward, fpdt_forward, fpdt_attention, make_plan
from tests.reference import dense_causal_attention, rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _backends(dtype):
    return [b for b in kernels.BACKENDS if kernels.backend_supports(b, "cuda", dtype, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_chunks", [1, 3, 4])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
def test_cuda_matches_float64_reference(dtype, num_chunks, offload, heads, kv_heads):
    gen = torch.Generator().manual_seed(num_chunks)
    seq = 96 * num_chunks
    full = [torch.randn(seq, 2, h, 64, generator=gen).to(dtype).double() for h in (heads, kv_heads, kv_heads)]
    dout = torch.randn(seq, 2, heads, 64, generator=gen).to(dtype).double()
    ref_in = [t.clone().requires_grad_() for t in full]
    ref_out = dense_causal_attention(*ref_in)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)
    for backend in _backends(dtype):
        local = [t.to("cuda", dtype).requires_grad_() for t in full]
        out = fpdt_attention(*local, num_chunks=num_chunks, offload=offload, backend=backend)
        grads = torch.autograd.grad(out, local, dout.to("cuda", dtype))
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
            err = rel_error(got.cpu(), want)
            assert err <= TOL[dtype], f"{backend}: {name} rel error {err:.2e}"


def test_cuda_offload_bounds_residency_and_device_memory():
    num_chunks, chunk = 8, 2048
    q, k, v = (torch.randn(num_chunks * chunk, 1, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    peaks = {}
    for offload in (False, True):
        plan = make_plan(q, k, v, sp_group=None, num_chunks=num_chunks, offload=offload)
        state = AttentionState(plan, q.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fpdt_forward(q, k, v, plan, state)
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - base
        if offload:
            assert state.residency.peak["kv"] <= 2
            state.residency.reset_peak()
        fpdt_backward(torch.randn_like(out), plan, state, kv_heads=8)
        if offload:
            assert all(n <= 2 for n in state.residency.peak.values()), state.residency.peak
        del out, state
    assert peaks[True] < peaks[False], f"offload did not lower the forward's device memory: {peaks}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_qkv_attention_matches_float64_reference(dtype, offload):
    """Projection and rotary inside the chunk loop, on CUDA (bf16: the weight gradient is summed
    over chunks in float32)."""
    from fpdt_ext.core.qkv import QKVLayout, fpdt_qkv_attention
    from tests.reference import dense_qkv_attention, rotary_angles, rotate

    gen = torch.Generator().manual_seed(5)
    seq, hidden, layout = 384, 128, QKVLayout(8, 2, 64)
    full = [torch.randn(seq, 2, hidden, generator=gen), torch.randn(layout.width, hidden, generator=gen) / 8,
            torch.randn(layout.width, generator=gen)]
    full = [t.to(dtype).double() for t in full]
    dout = torch.randn(seq, 2, 8 * 64, generator=gen).to(dtype).double()
    angles = rotary_angles(seq, 64)
    ref_in = [t.clone().requires_grad_() for t in full]
    ref_out = dense_qkv_attention(*ref_in, 8, 2, angles)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)
    local = [t.to("cuda", dtype).requires_grad_() for t in full]
    out = fpdt_qkv_attention(*local, layout, rotary_freqs=angles.float().cuda(), rotary=rotate, num_chunks=4,
                             offload=offload)
    grads = torch.autograd.grad(out, local, dout.to("cuda", dtype))
    for name, got, want in zip(("out", "dx", "dW", "db"), (out, *grads), (ref_out, *ref_grads)):
        err = rel_error(got.cpu(), want)
        assert err <= TOL[dtype], f"{name} rel error {err:.2e}"


def test_cuda_gemms_sum_low_precision_products_in_float32():
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(512, 256, generator=gen), torch.randn(256, 384, generator=gen)
    want = a.double() @ b.double()
    acc = torch.zeros(512, 384, device="cuda")
    for _ in range(4):  # four chunks' products summed
        kernels.addmm_fp32(acc, a.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16))
    got = kernels.mm_fp32(a.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16))
    assert got.dtype == torch.float32 and acc.dtype == torch.float32
    assert rel_error(got.cpu(), want) < 1e-2 and rel_error(acc.cpu(), 4 * want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_chunked_loss_matches_float64_reference(dtype):
    from fpdt_ext.mcore.loss import chunked_lm_loss

    gen = torch.Generator().manual_seed(8)
    seq, batch, hidden, vocab = 600, 2, 128, 5000
    h = torch.randn(seq, batch, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / 8
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    ref_h, ref_w = (t.to(dtype).double().requires_grad_() for t in (h, w))
    logits = ref_h @ ref_w.t()
    ref = -logits.log_softmax(-1).gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()
    ref_grads = torch.autograd.grad(ref.sum(), [ref_h, ref_w])
    dh, dw = (t.to("cuda", dtype).requires_grad_() for t in (h, w))
    loss = chunked_lm_loss(dh, dw, labels.cuda(), num_chunks=3)
    grads = torch.autograd.grad(loss.sum(), [dh, dw])
    tol = TOL[dtype]
    assert rel_error(loss.cpu(), ref) <= tol
    for got, want in zip(grads, ref_grads):
        assert rel_error(got.cpu(), want) <= tol
