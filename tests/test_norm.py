"""fpdt_ext.norm: chunked LayerNorm/RMSNorm against torch's own, forward and backward."""

from __future__ import annotations

import types

import pytest
import torch

from fpdt_ext.norm import ChunkedLayerNorm, ChunkedRMSNorm, FPDTNorm


def _config(chunks, sp=1):
    # what the mixin reads of an FPDTConfig: the FPDT size and the chunk count for a length
    return types.SimpleNamespace(fpdt_parallel_size=sp, num_chunks=lambda seq: chunks)


@pytest.mark.parametrize("chunks", [2, 3, 4])  # 1 chunk is torch's own forward
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_chunked_norm_matches_torch_float64(kind, chunks):
    gen = torch.Generator().manual_seed(chunks)
    x = torch.randn(12, 2, 16, generator=gen, dtype=torch.float64) * 3 + 1
    dout = torch.randn(12, 2, 16, generator=gen, dtype=torch.float64)
    reference = getattr(torch.nn, kind)(16, eps=1e-5, dtype=torch.float64)
    chunked = (ChunkedLayerNorm if kind == "LayerNorm" else ChunkedRMSNorm)(16, eps=1e-5, dtype=torch.float64)
    chunked.fpdt_config = _config(chunks)
    with torch.no_grad():
        for norm in (reference, chunked):
            norm.weight.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
            if kind == "LayerNorm":
                norm.bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    results = []
    for norm in (reference, chunked):
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        grads = torch.autograd.grad(out, [leaf, *norm.parameters()], dout)
        results.append((out, *grads))
    assert len(results[1]) == (4 if kind == "LayerNorm" else 3)
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no autograd: torch's own forward, same values
        torch.testing.assert_close(chunked(x), results[0][0], rtol=1e-12, atol=1e-12)


def test_fpdt_norm_builds_from_megatron_arguments():
    config = types.SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=False,
                                   sequence_parallel=False)
    norm = FPDTNorm(config, 32, 1e-6, fpdt_config=_config(2))
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    with pytest.raises(ValueError, match="L2Norm"):
        FPDTNorm(types.SimpleNamespace(normalization="L2Norm"), 32, fpdt_config=_config(2))


def test_fusing_is_refused_where_megatron_would_free_the_norm_output():
    """A fused norm passes the residual stream through; megatron-core's selective layernorm
    recompute frees the norm's output, so fusing must be refused there (and for other norms)."""
    from fpdt_ext.norm import fuse_into_next

    norm = ChunkedRMSNorm(16)
    norm.fpdt_config = _config(2)
    selective = types.SimpleNamespace(recompute_granularity="selective", recompute_modules=["layernorm"])
    assert not fuse_into_next(norm, selective) and not norm.fused_into_next
    assert not fuse_into_next(torch.nn.RMSNorm(16), types.SimpleNamespace(recompute_granularity=None,
                                                                          recompute_modules=None))
    assert fuse_into_next(norm, types.SimpleNamespace(recompute_granularity="full", recompute_modules=None))
    x = torch.randn(4, 1, 16)
    assert norm(x) is x  # fused: the module passes its input through
    torch.testing.assert_close(norm.as_input_norm()(x), torch.nn.functional.rms_norm(x, (16,), norm.weight))
