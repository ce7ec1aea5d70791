"""Single-process float64 references the parallel and chunked paths are checked against."""

from __future__ import annotations

import math

import torch


def dense_causal_attention(q, k, v, scale=None):
    """Plain causal attention on full sequences: q [S, b, H, d], k/v [S, b, KV, d] -> [S, b, H, d]."""
    seq, _, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu_(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v)


def rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
