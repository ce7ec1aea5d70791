"""The chunked LayerNorm/RMSNorm modules (fpdt_ext.mcore.norm) against torch's own, forward and backward."""

from __future__ import annotations

import types

import pytest
import torch

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.mcore.norm import ChunkedLayerNorm, ChunkedRMSNorm, TorchNorm, chunked_norm_class

MEGATRON_CONFIG = types.SimpleNamespace(layernorm_zero_centered_gamma=False, sequence_parallel=False)


def _megatron_config(kind="LayerNorm", zero_centered=False):
    return types.SimpleNamespace(layernorm_zero_centered_gamma=zero_centered, sequence_parallel=False,
                                 normalization=kind)


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
    with pytest.raises(ValueError, match="sequence parallelism"):
        ChunkedRMSNorm(types.SimpleNamespace(layernorm_zero_centered_gamma=False, sequence_parallel=True), 8,
                       fpdt_config=_config(2))


def _zero_centered_norms(kind, chunks):
    """(plain torch norm, [1p norms]): TorchNorm and the chunked norm with zero-centred gamma."""
    one_p = _megatron_config(kind, zero_centered=True)
    return getattr(torch.nn, kind)(16, eps=1e-5, dtype=torch.float64), [
        TorchNorm(one_p, 16, eps=1e-5).double(),
        chunked_norm_class(kind)(one_p, 16, eps=1e-5, fpdt_config=_config(chunks)).double()]


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_zero_centered_norms_equal_the_plain_norm_with_weight_plus_one_float64(kind):
    """--apply-layernorm-1p: weights start at zero (the same function as a plain norm at init); with
    weight w they compute the plain norm with weight w + 1, forward and backward (w's gradient is
    the plain weight's). For TorchNorm (baseline, q/k and final norms) and the chunked norm, called
    whole and handed to a loop (InputNorm, ChunkNormGrads: the QKV loop's backward)."""
    from fpdt_ext.core.norm import ChunkNormGrads

    plain, one_p_norms = _zero_centered_norms(kind, chunks=3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(12, 2, 16, generator=gen, dtype=torch.float64) * 3 + 1
    dout = torch.randn(12, 2, 16, generator=gen, dtype=torch.float64)
    for norm in one_p_norms:
        assert torch.equal(norm.weight, torch.zeros(16, dtype=torch.float64)), type(norm)
        torch.testing.assert_close(norm(x), plain(x), rtol=1e-12, atol=1e-12)  # at init: plain ones
    weight = torch.randn(16, generator=gen, dtype=torch.float64)
    bias = torch.randn(16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(weight + 1)
        for norm in one_p_norms:
            norm.weight.copy_(weight)
        for norm in [plain, *one_p_norms] if kind == "LayerNorm" else []:
            norm.bias.copy_(bias)

    def run(norm):
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        return (out, *torch.autograd.grad(out, [leaf, *norm.parameters()], dout))

    want = run(plain)
    for norm in one_p_norms:
        got = run(norm)
        assert len(got) == len(want) == (4 if kind == "LayerNorm" else 3)
        for name, w, g in zip(["out", "dx", "dweight", "dbias"], want, got):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{type(norm).__name__} {name}: {m}")
    handed = one_p_norms[1].input_norm()
    assert handed.zero_centered and handed.weight is one_p_norms[1].weight
    grads = ChunkNormGrads(handed.weight, handed.bias, handed.eps, handed.rms, handed.zero_centered)
    leaf, out = grads.output(x)
    torch.testing.assert_close(out, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads.backward(leaf, out, dout), want[1], rtol=1e-12, atol=1e-12)
    for w, g in zip(want[2:], grads.result()):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # and the weight really is offset: the plain norm with the stored weight differs
    assert not torch.allclose(getattr(torch.nn.functional, "rms_norm" if kind == "RMSNorm" else "layer_norm")(
        x, (16,), weight, *([bias] if kind == "LayerNorm" else []), eps=1e-5), want[0])


def test_torch_norm_builds_from_megatron_arguments():
    """TorchNorm: WrappedTorchNorm's constructor and parameter names, torch's numerics without 1p."""
    rms = TorchNorm(_megatron_config("RMSNorm"), 8, 1e-6)
    assert [n for n, _ in rms.named_parameters()] == ["weight"] and rms.eps == 1e-6
    assert torch.equal(rms.weight, torch.ones(8))
    layer = TorchNorm(_megatron_config("LayerNorm"), 8)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), torch.nn.LayerNorm(8)(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="L2Norm"):
        TorchNorm(_megatron_config("L2Norm"), 8)


def test_input_norm_hands_over_the_parameters_and_changes_nothing():
    """What a layer hands to the module it feeds: the norm's own parameters; the module itself
    still normalises when called (nothing is switched off on it)."""
    norm = ChunkedRMSNorm(MEGATRON_CONFIG, 16, fpdt_config=_config(2))
    x = torch.randn(4, 1, 16)
    handed = norm.input_norm()
    assert handed.weight is norm.weight and handed.rms and handed.bias is None
    torch.testing.assert_close(handed(x), torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5))
    torch.testing.assert_close(norm(x), handed(x))
