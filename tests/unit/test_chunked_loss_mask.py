"""FPDT's chunked logits+loss under a loss mask with zeros, against float64 cross entropy.

The trainer multiplies the per-token losses by the mask and divides by the number of
masked-in tokens (at least 1). Here that is done on the chunked loss for chunk counts that
do and do not divide the sequence, and compared with a float64 reference that picks the
masked-in tokens by index (a NaN or inf at a masked-out token would show in the chunked
result, not in the reference). Masks: scattered zeros; a whole sequence masked out; a span
as long as several loss chunks masked out, with labels outside the vocabulary there (as an
ignore index would be). An all-zero mask gives a zero loss and zero gradients, not NaN.
"""

from __future__ import annotations

import pytest
import torch

from fpdt_ext.mcore.loss import chunked_lm_loss

S, B, H, V = 30, 3, 16, 40


def _inputs():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(S, B, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.float64)
    mask[0] = (torch.rand(S, generator=gen) > 0.4).double()  # scattered zeros
    mask[1] = 0.0  # a whole sequence masked out
    mask[2, 8:23] = 0.0  # a long span (several chunks) masked out ...
    mask[2, 0] = 0.0
    labels[2, 8:23] = -100  # ... with labels no vocabulary holds
    return hidden, weight, labels, mask


def _masked_mean(per_token, mask):
    """The trainer's normalisation: masked sum / masked-in tokens (at least 1)."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _reference(hidden, weight, labels, mask):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    picked = mask != 0
    logits = torch.einsum("sbh,vh->bsv", h, w)[picked]  # [tokens, V], masked-in only
    loss = -logits.log_softmax(-1).gather(-1, labels[picked].unsqueeze(-1)).sum() / picked.sum()
    return loss.detach(), *torch.autograd.grad(loss, [h, w])


@pytest.mark.parametrize("num_chunks", [1, 4, 7])
def test_chunked_loss_with_masked_tokens_matches_float64(num_chunks):
    hidden, weight, labels, mask = _inputs()
    want_loss, want_dh, want_dw = _reference(hidden, weight, labels, mask)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    per_token = chunked_lm_loss(h, w, labels, num_chunks=num_chunks)  # [b, s]
    assert torch.isfinite(per_token).all()
    loss = _masked_mean(per_token, mask)
    dh, dw = torch.autograd.grad(loss, [h, w])
    assert abs(loss.item() - want_loss.item()) < 1e-12 * abs(want_loss.item())
    torch.testing.assert_close(dh, want_dh, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dw, want_dw, rtol=1e-12, atol=1e-14)
    assert torch.equal(dh.transpose(0, 1)[mask == 0], torch.zeros_like(dh.transpose(0, 1)[mask == 0]))
    # the mask matters here: the unmasked mean is another number
    assert abs(per_token.mean().item() - want_loss.item()) > 1e-3


@pytest.mark.parametrize("num_chunks", [1, 4])
def test_all_zero_mask_gives_zero_loss_and_gradients(num_chunks):
    hidden, weight, labels, _ = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = _masked_mean(chunked_lm_loss(h, w, labels, num_chunks=num_chunks), torch.zeros(B, S, dtype=torch.float64))
    dh, dw = torch.autograd.grad(loss, [h, w])
    assert loss.item() == 0.0
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
