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


def rotate(t, angles):
    """Rotary embedding, half-split convention: t [s, b, heads, d], angles [s, b|1, 1, d]."""
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * angles.cos().to(t.dtype) + rotated * angles.sin().to(t.dtype)


def rotary_angles(seq, head_dim, base=10000.0):
    """[S, 1, 1, d] angles of token positions 0..S-1 (each frequency used by both halves)."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def dense_qkv_attention(x, weight, bias, num_heads, kv_heads, angles=None, norm=None):
    """Reference of FPDT attention from hidden states: x [S, b, h] -> [S, b, H*d].

    ``norm = (weight, bias or None, rms)`` is applied to x first (eps 1e-5). The
    projection's output is laid out as megatron-core's: per KV group, its query
    heads, its key head, its value head.
    """
    seq, b, _ = x.shape
    if norm is not None:
        norm_weight, norm_bias, rms = norm
        if rms:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight
        else:
            mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
            x = (x - mean) * torch.rsqrt(var + 1e-5) * norm_weight + norm_bias
    head_dim = weight.shape[0] // (num_heads + 2 * kv_heads)
    group = num_heads // kv_heads
    mixed = torch.nn.functional.linear(x, weight, bias).view(seq, b, kv_heads, (group + 2) * head_dim)
    q = mixed[..., :group * head_dim].reshape(seq, b, num_heads, head_dim)
    k = mixed[..., group * head_dim:(group + 1) * head_dim]
    v = mixed[..., (group + 1) * head_dim:]
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
    return dense_causal_attention(q, k, v).flatten(2)
