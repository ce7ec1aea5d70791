"""The chunked LayerNorm/RMSNorm modules (fpdt_ext.mcore.norm) against torch's own, forward and backward."""

from __future__ import annotations

import types

import pytest
import torch

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.mcore.norm import ChunkedLayerNorm, ChunkedRMSNorm, chunked_norm_class

MEGATRON_CONFIG = types.SimpleNamespace(layernorm_zero_centered_gamma=False, sequence_parallel=False)


def _config(chunks):
    return FPDTConfig(fpdt_num_chunks=chunks)


@pytest.mark.parametrize("chunks", [2, 3, 4])  # 1 chunk is torch's own forward
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_chunked_norm_matches_torch_float64(kind, chunks):
    gen = torch.Generator().manual_seed(chunks)
    x = torch.randn(12, 2, 16, generator=gen, dtype=torch.float64) * 3 + 1
    dout = torch.randn(12, 2, 16, generator=gen, dtype=torch.float64)
    reference = getattr(torch.nn, kind)(16, eps=1e-5, dtype=torch.float64)
    chunked = chunked_norm_class(kind)(MEGATRON_CONFIG, 16, eps=1e-5, fpdt_config=_config(chunks)).double()
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


def test_chunked_norm_builds_from_megatron_arguments():
    norm = chunked_norm_class("RMSNorm")(MEGATRON_CONFIG, 32, 1e-6, fpdt_config=_config(2))
    assert isinstance(norm, torch.nn.RMSNorm) and isinstance(norm, ChunkedRMSNorm) and norm.eps == 1e-6
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert [n for n, _ in ChunkedLayerNorm(MEGATRON_CONFIG, 8, fpdt_config=_config(2)).named_parameters()] == [
        "weight", "bias"]
    with pytest.raises(ValueError, match="L2Norm"):
        chunked_norm_class("L2Norm")
    with pytest.raises(ValueError, match="zero-centred gamma"):
        ChunkedRMSNorm(types.SimpleNamespace(layernorm_zero_centered_gamma=True, sequence_parallel=False), 8,
                       fpdt_config=_config(2))


def test_input_norm_hands_over_the_parameters_and_changes_nothing():
    """What a layer hands to the module it feeds: the norm's own parameters; the module itself
    still normalises when called (nothing is switched off on it)."""
    norm = ChunkedRMSNorm(MEGATRON_CONFIG, 16, fpdt_config=_config(2))
    x = torch.randn(4, 1, 16)
    handed = norm.input_norm()
    assert handed.weight is norm.weight and handed.rms and handed.bias is None
    torch.testing.assert_close(handed(x), torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5))
    torch.testing.assert_close(norm(x), handed(x))
