"""The one adapter for block attention: ``(out, lse)`` forward and its backward;
and the GEMMs whose low-precision inputs are summed in float32 (:func:`mm_fp32`,
:func:`addmm_fp32`).

Every attention-kernel call in the project goes through this file, and private
kernel APIs appear here only.

Layouts (batch first, "bshd"; only the last dim must be contiguous):
    q            [b, sq, hq, d]
    k, v         [b, sk, hkv, d]     hq % hkv == 0 (GQA)
    out          [b, sq, hq, d]      q.dtype
    lse          [b, hq, sq]         float32 (float64 for float64 inputs), natural log
``causal=True`` means the top-left aligned causal mask on a square block
(sq == sk): FPDT only uses it on diagonal blocks.

The backward takes the *final* (merged) ``out`` and ``lse`` of the query rows,
so the gradient of one block is exact even though its softmax was normalised
over other blocks too: P = exp(S - lse), dS = P * (dP - rowsum(dO * O)).

Backends, chosen by :func:`select_backend`:

    name            device  dtypes              API (supported versions)
    flash_attn      cuda    fp16, bf16          flash_attn.flash_attn_func (public) forward;
                                                flash_attn.flash_attn_interface._flash_attn_backward
                                                (private; arguments bound by name) backward;
                                                flash-attn >= 2.5, < 3 (untested on GPU: not in the image)
    cuda_flash      cuda    fp16, bf16, d<=256  aten._scaled_dot_product_flash_attention(+_backward),
                                                torch >= 2.3 (run on an H200, torch 2.11)
    cuda_efficient  cuda    fp32 (any)          aten._scaled_dot_product_efficient_attention(+_backward),
                                                torch >= 2.3 (lse padded to a multiple of 32; run on
                                                an H200, torch 2.11)
    cpu_flash       cpu     fp32, bf16, fp16,   aten._scaled_dot_product_flash_attention_for_cpu
                            fp64                (+_backward), torch >= 2.3 (tested 2.13)
    math            any     any                 plain torch ops; float64 reference path for tests,
                                                O(sq*sk) memory
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor
aten = torch.ops.aten

BACKENDS = ("flash_attn", "cuda_flash", "cuda_efficient", "cpu_flash", "math")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# The merge of partial results (the numerically delicate step)
# ---------------------------------------------------------------------------


def merge_into(acc_out: Tensor, acc_lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> None:
    """Fold one block's partial result into the running one, in place.

    acc_out [b, s, h, d] and acc_lse [b, h, s] are the accumulators (float32 or
    float64); blk_out/blk_lse the new block. With w = exp(blk_lse - new_lse) =
    sigmoid(blk_lse - acc_lse): out <- out + w * (blk_out - out) and
    lse <- lse - logsigmoid(lse - blk_lse). Stable for any lse magnitudes; rows
    with lse = -inf in both inputs are not supported (FPDT never produces them:
    every causal query row sees at least itself).
    """
    weight = torch.sigmoid(blk_lse - acc_lse)  # [b, h, s]
    acc_out.lerp_(blk_out.to(acc_out.dtype), weight.transpose(1, 2).unsqueeze(-1))
    acc_lse.sub_(torch.nn.functional.logsigmoid(acc_lse - blk_lse))


# ---------------------------------------------------------------------------
# Helpers shared by the torch-kernel backends
# ---------------------------------------------------------------------------


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    """[b, s, hkv, d] -> [b, s, hkv*groups, d]: torch's private kernels take no GQA."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _reduce_kv(dx: Tensor, groups: int) -> Tensor:
    """Gradient of :func:`_expand_kv`: [b, s, hkv*groups, d] -> [b, s, hkv, d]."""
    return dx if groups == 1 else dx.unflatten(2, (-1, groups)).sum(3)


def _groups(q: Tensor, k: Tensor) -> int:
    return q.shape[2] // k.shape[2]


# ---------------------------------------------------------------------------
# math: plain torch, any device and dtype
# ---------------------------------------------------------------------------


def _math_scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """Scores [b, hkv, g, sq, sk] in the compute dtype (float32 or float64)."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, sq, hkv, hq // hkv, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    if causal:
        mask = torch.ones(sq, k.shape[1], dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(mask, float("-inf"))
    return scores


def _math_forward(q, k, v, causal, scale):
    cdt = lse_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    b, sq, hq, d = q.shape
    scores = _math_scores(qc, kc, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)  # [b, hkv, g, sq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vc).reshape(b, sq, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, sq)


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    cdt = lse_dtype(q.dtype)
    qc, kc, vc, oc, doc = (t.to(cdt) for t in (q, k, v, out, dout))
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scores = _math_scores(qc, kc, causal, scale)
    probs = torch.exp(scores - lse.to(cdt).reshape(b, hkv, g, sq, 1))  # [b, hkv, g, sq, sk]
    dog = doc.reshape(b, sq, hkv, g, d)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, dog)
    dprobs = torch.einsum("bqhgd,bkhd->bhgqk", dog, vc)
    delta = (dog * oc.reshape(b, sq, hkv, g, d)).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, kc).reshape(b, sq, hq, d)
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, qc.reshape(b, sq, hkv, g, d))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------
# cpu_flash: torch's CPU flash kernels return the logsumexp
# ---------------------------------------------------------------------------


def _cpu_flash_forward(q, k, v, causal, scale):
    g = _groups(q, k)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2),
        0.0, causal, scale=scale,
    )  # out [b, hq, sq, d]; lse [b, hq, sq] (strided)
    return out.transpose(1, 2), lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    g = _groups(q, k)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2),
        _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2),
        out.transpose(1, 2), lse.contiguous(), 0.0, causal, scale=scale,
    )  # [b, h, s, d]
    return dq.transpose(1, 2), _reduce_kv(dk.transpose(1, 2), g), _reduce_kv(dv.transpose(1, 2), g)


# ---------------------------------------------------------------------------
# cuda_flash / cuda_efficient: torch's CUDA kernels
# ---------------------------------------------------------------------------


def _cuda_flash_forward(q, k, v, causal, scale):
    g = _groups(q, k)
    out, lse, *_ = aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2),
        0.0, causal, False, scale=scale,
    )
    return out.transpose(1, 2), lse


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale):
    g = _groups(q, k)
    # Without dropout the kernel reads neither the RNG state nor the (dense, so
    # undefined) cumulative lengths; max_q/max_k are the block lengths.
    unused_rng = torch.empty(2, dtype=torch.uint64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2),
        _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2),
        out.transpose(1, 2), lse.contiguous(), None, None, q.shape[1], k.shape[1],
        0.0, causal, unused_rng, unused_rng[0], scale=scale,
    )
    return dq.transpose(1, 2), _reduce_kv(dk.transpose(1, 2), g), _reduce_kv(dv.transpose(1, 2), g)


def _cuda_efficient_forward(q, k, v, causal, scale):
    g = _groups(q, k)
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q.transpose(1, 2), _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2),
        None, True, 0.0, causal, scale=scale,
    )
    return out.transpose(1, 2), lse[..., : q.shape[1]]  # lse may be padded to a multiple of 32


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale):
    g = _groups(q, k)
    padded = torch.zeros(*lse.shape[:2], math.ceil(q.shape[1] / 32) * 32, dtype=lse.dtype, device=lse.device)
    padded[..., : q.shape[1]] = lse
    unused_rng = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2),
        _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2),
        None, out.transpose(1, 2), padded, unused_rng, unused_rng, 0.0,
        [True, True, True, False], causal, scale=scale,
    )
    return dq.transpose(1, 2), _reduce_kv(dk.transpose(1, 2), g), _reduce_kv(dv.transpose(1, 2), g)


# ---------------------------------------------------------------------------
# flash_attn: the flash-attn package (native GQA, bshd layout)
# ---------------------------------------------------------------------------

FLASH_ATTN_VERSIONS = ((2, 5), (3, 0))  # [min, max)


def _flash_attn_module():
    """The flash-attn interface module if a supported version is installed, else None."""
    try:
        module = importlib.import_module("flash_attn.flash_attn_interface")
        version = importlib.import_module("flash_attn").__version__
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    if not FLASH_ATTN_VERSIONS[0] <= major_minor < FLASH_ATTN_VERSIONS[1]:
        return None
    return module


def _flash_attn_forward(q, k, v, causal, scale):
    module = _flash_attn_module()
    out, lse, _ = module.flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True
    )
    return out, lse[..., : q.shape[1]]


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    module = _flash_attn_module()
    fn = module._flash_attn_backward
    params = inspect.signature(fn).parameters
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kwargs = dict(
        dout=dout.contiguous(), q=q, k=k, v=v, out=out, softmax_lse=lse.contiguous(),
        dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
    )
    optional = dict(
        window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, deterministic=False, rng_state=None,
    )
    kwargs.update({name: value for name, value in optional.items() if name in params})
    unknown = [n for n, p in params.items() if n not in kwargs and p.default is inspect.Parameter.empty]
    if unknown:
        raise RuntimeError(
            f"flash-attn {importlib.import_module('flash_attn').__version__}: _flash_attn_backward "
            f"takes unknown arguments {unknown}; use backend='cuda_flash' or a flash-attn in "
            f"[{FLASH_ATTN_VERSIONS[0]}, {FLASH_ATTN_VERSIONS[1]})"
        )
    fn(**{name: kwargs[name] for name in params if name in kwargs})
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Selection and the public entry points
# ---------------------------------------------------------------------------


class _Backend(NamedTuple):
    forward: Callable
    backward: Callable


_BACKENDS: Dict[str, _Backend] = {
    "flash_attn": _Backend(_flash_attn_forward, _flash_attn_backward),
    "cuda_flash": _Backend(_cuda_flash_forward, _cuda_flash_backward),
    "cuda_efficient": _Backend(_cuda_efficient_forward, _cuda_efficient_backward),
    "cpu_flash": _Backend(_cpu_flash_forward, _cpu_flash_backward),
    "math": _Backend(_math_forward, _math_backward),
}

_HALF = (torch.float16, torch.bfloat16)


def backend_supports(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    device = torch.device(device)
    if name == "math":
        return True
    if name == "cpu_flash":
        return device.type == "cpu" and dtype in (torch.float32, torch.float64, *_HALF)
    if device.type != "cuda":
        return False
    if name == "flash_attn":
        return dtype in _HALF and head_dim <= 256 and _flash_attn_module() is not None
    if name == "cuda_flash":
        return dtype in _HALF and head_dim <= 256
    if name == "cuda_efficient":
        return dtype in (torch.float32, *_HALF)
    return False


def select_backend(device, dtype: torch.dtype, head_dim: int, requested: Optional[str] = None) -> str:
    """The backend to use: ``requested`` if it supports the inputs, else the best available."""
    if requested not in (None, "auto"):
        if requested not in _BACKENDS:
            raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS} or 'auto'")
        if not backend_supports(requested, device, dtype, head_dim):
            raise ValueError(
                f"attention backend {requested!r} does not support {dtype} with head dim "
                f"{head_dim} on {torch.device(device).type}; use backend='auto'"
            )
        return requested
    for name in BACKENDS:
        if backend_supports(name, device, dtype, head_dim):
            return name
    return "math"


def block_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    """Attention of one block: returns (out [b, sq, hq, d], lse [b, hq, sq])."""
    return _BACKENDS[backend].forward(q, k, v, causal, scale)


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    *, causal: bool, scale: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of one block, given the rows' final out and lse."""
    return _BACKENDS[backend].backward(dout, q, k, v, out, lse, causal, scale)


# ---------------------------------------------------------------------------
# GEMMs of low-precision inputs summed in float32
# ---------------------------------------------------------------------------
#
# The chunked loss and the QKV weight gradient multiply bf16/fp16 tensors and sum the products
# over chunks in float32. On CUDA, torch's GEMM with ``out_dtype=torch.float32`` (torch >= 2.8)
# reads the low-precision inputs at tensor-core speed and writes float32, accumulating into the
# float32 buffer in place; it is probed once per device and dtype (against a float64 product)
# and used only where it works. Elsewhere (the CPU, or a torch without it) the product is made in
# the inputs' dtype (float32 accumulation inside the GEMM) and added to the float32 buffer: the
# precision of Megatron's own bf16 output layer. Never a float32 GEMM of low-precision inputs
# upcast (about 1/12 of bf16 speed on Hopper).

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _out_dtype_gemm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm``/``torch.addmm`` with ``out_dtype=torch.float32`` work on ``device``."""
    if device.type != "cuda":
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a, b = (torch.randn(64, 64, generator=gen).to(dtype) for _ in range(2))
        want = a.double() @ b.double()
        acc = torch.ones(64, 64, device=device)
        got = torch.mm(a.to(device), b.to(device), out_dtype=torch.float32)
        torch.addmm(acc, a.to(device), b.to(device), out_dtype=torch.float32, out=acc)
        ok = got.dtype == torch.float32 and torch.allclose(got.double().cpu(), want, rtol=1e-4, atol=1e-3)
        return ok and torch.allclose(acc.double().cpu(), want + 1, rtol=1e-4, atol=1e-3)
    except (RuntimeError, TypeError):
        return False


def gemm_path(device, dtype: torch.dtype) -> str:
    """Which GEMM :func:`mm_fp32` / :func:`addmm_fp32` use for inputs of ``dtype`` on ``device``."""
    if dtype not in _LOW_PRECISION:
        return "native"
    return "out_dtype" if _out_dtype_gemm_works(torch.device(device), dtype) else "low_precision_product"


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D) in float32 for low-precision inputs (in the inputs' dtype otherwise)."""
    path = gemm_path(a.device, a.dtype)
    if path == "native":
        return torch.mm(a, b)
    if path == "out_dtype":
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` (2-D), in place; ``acc`` float32 (or float64) for any input dtype."""
    path = gemm_path(a.device, a.dtype) if acc.dtype != a.dtype else "native"
    if path == "native":
        acc.addmm_(a, b)
    elif path == "out_dtype":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))
