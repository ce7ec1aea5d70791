"""FPDT on 1, 2 and 4 gloo processes against single-process references.

The chunk all-to-all against the layout, and fpdt_attention against float64 attention:

Forward output and dq, dk, dv, over chunk counts, offload on/off (and to the disk tier), batch 2,
MHA and GQA (including KV heads fewer than, or not dividing, the FPDT size),
float32, bfloat16 and float64. Each world size is spawned once; every case
runs inside it and reports its errors; the tests below assert on them.
"""

from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch
import torch.distributed as dist

from fpdt_ext.core.comm import head_to_seq, seq_to_head
from fpdt_ext.core.attention import AttentionState, fpdt_backward, fpdt_forward, fpdt_attention, make_plan
from fpdt_ext.core.layout import fpdt_shard
from fpdt_ext.core.qkv import InputNorm, QKVLayout, fpdt_qkv_attention
from fpdt_ext.testing.spawn import run_world
from tests.disk_dir import shared_disk_scratch_dir
from tests.reference import dense_causal_attention, dense_qkv_attention, rel_error, rotary_angles, rotate

WORLD_SIZES = (1, 2, 4)
CHUNKS = (1, 2, 3, 4, 8)
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (8, 1), "gqa12x6": (12, 6)}  # (H, KV)
# Tolerances on max|err|/max|ref| against float64 attention of the same (rounded) inputs.
TOLERANCE = {"fp32": 2e-5, "bf16": 3e-2, "fp64": 1e-12}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
SUB_CHUNK = 3  # tokens per sub-chunk: S = P * u * 3
BATCH, HEAD_DIM = 2, 8


def case_list(world_size):
    cases = []
    for u, offload, heads, dtype in itertools.product(CHUNKS, (False, True), HEADS, ("fp32", "bf16")):
        if HEADS[heads][0] % world_size == 0:
            cases.append((u, offload, heads, dtype, None))
    for u, offload in itertools.product((1, 3, 4), (False, True, "disk")):  # exact algorithm check
        cases.append((u, offload, "gqa", "fp64", "math"))
    for heads in HEADS:  # the disk tier (offload to a file) with every head layout
        if HEADS[heads][0] % world_size == 0:
            cases.append((3, "disk", heads, "fp32", None))
    return cases


def case_id(case):
    u, offload, heads, dtype, backend = case
    where = {False: "resident", True: "offload", "disk": "disk"}[offload]
    return f"u{u}-{where}-{heads}-{dtype}" + (f"-{backend}" if backend else "")


def offload_args(offload):
    """fpdt_attention's offload arguments for a case: resident, host memory, or a file on disk."""
    return dict(offload=bool(offload), offload_dir=shared_disk_scratch_dir() if offload == "disk" else None)


def run_case(rank, world_size, case, group):
    u, offload, heads, dtype_name, backend = case
    dtype = DTYPES[dtype_name]
    num_heads, kv_heads = HEADS[heads]
    seq = world_size * u * SUB_CHUNK
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))  # same on every rank
    full = [torch.randn(seq, BATCH, h, HEAD_DIM, generator=gen).to(dtype).double()
            for h in (num_heads, kv_heads, kv_heads)]
    dout = torch.randn(seq, BATCH, num_heads, HEAD_DIM, generator=gen).to(dtype).double()
    ref_in = [t.clone().requires_grad_() for t in full]
    ref_out = dense_causal_attention(*ref_in)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)

    def shard(t):
        return fpdt_shard(t, dim=0, sp_rank=rank, sp_size=world_size, num_chunks=u)

    local = [shard(t).to(dtype).requires_grad_() for t in full]
    out = fpdt_attention(*local, sp_group=group, num_chunks=u, backend=backend, **offload_args(offload))
    grads = torch.autograd.grad(out, local, shard(dout).to(dtype))
    names = ("out", "dq", "dk", "dv")
    return {n: rel_error(a, shard(e)) for n, a, e in zip(names, (out, *grads), (ref_out, *ref_grads))}


def qkv_case_list(world_size):
    """fpdt_qkv_attention (input norm, projection and rotary inside the chunk loop) cases: heads,
    bias, rotary and the norm (none, LayerNorm, RMSNorm) vary with the chunk count so each world
    covers every combination of each with the others once or more."""
    cases = []
    for (u, offload), heads, extras, norm in zip(itertools.product((1, 3, 4), (False, True)),
                                                 itertools.cycle(("gqa", "mqa", "mha")),
                                                 itertools.cycle(((True, True), (False, True), (True, False))),
                                                 itertools.cycle((None, "ln", "rms", "ln"))):
        cases.append((u, offload, heads, "fp32", None) + extras + (norm,))
    cases.append((3, True, "gqa", "fp64", "math", True, True, "ln"))
    cases.append((4, False, "mqa", "fp64", "math", False, True, "rms"))
    cases.append((4, "disk", "gqa", "fp64", "math", True, True, "rms"))
    cases.append((3, "disk", "mqa", "fp64", "math", False, True, "ln"))  # dout received in place
    return cases


def qkv_case_id(case):
    *core, bias, rope, norm = case
    return case_id(tuple(core)) + ("-bias" if bias else "") + ("-rope" if rope else "") + (f"-{norm}" if norm else "")


def run_qkv_case(rank, world_size, case, group):
    u, offload, heads, dtype_name, backend, bias, rope, norm = case
    dtype = DTYPES[dtype_name]
    num_heads, kv_heads = HEADS[heads]
    hidden, seq = 16, world_size * u * SUB_CHUNK
    layout = QKVLayout(num_heads, kv_heads, HEAD_DIM)
    gen = torch.Generator().manual_seed(zlib.crc32(qkv_case_id(case).encode()))
    full = [torch.randn(seq, BATCH, hidden, generator=gen), torch.randn(layout.width, hidden, generator=gen) / 4]
    full.append(torch.randn(layout.width, generator=gen) if bias else None)
    full.append(1 + torch.randn(hidden, generator=gen) / 4 if norm else None)  # norm weight
    full.append(torch.randn(hidden, generator=gen) / 4 if norm == "ln" else None)  # LayerNorm's bias
    full = [None if t is None else t.to(dtype).double() for t in full]
    angles = rotary_angles(seq, HEAD_DIM) if rope else None
    dout = torch.randn(seq, BATCH, num_heads * HEAD_DIM, generator=gen).to(dtype).double()
    ref_all = [t.clone().requires_grad_() if t is not None else None for t in full]
    ref_in = [t for t in ref_all if t is not None]
    ref_out = dense_qkv_attention(*ref_all[:3], num_heads, kv_heads, angles,
                                  norm=(ref_all[3], ref_all[4], norm == "rms") if norm else None)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)

    def shard(t):
        return fpdt_shard(t, dim=0, sp_rank=rank, sp_size=world_size, num_chunks=u)

    x = shard(full[0]).to(dtype).requires_grad_()
    given = [None if t is None else t.to(dtype).requires_grad_() for t in full[1:]]
    params = [t for t in given if t is not None]
    input_norm = InputNorm(given[2], given[3], 1e-5, rms=norm == "rms") if norm else None
    out = fpdt_qkv_attention(x, given[0], given[1], layout, norm=input_norm,
                             rotary_freqs=None if angles is None else shard(angles).to(torch.promote_types(dtype, torch.float32)),
                             rotary=rotate if rope else None, sp_group=group, num_chunks=u,
                             backend=backend, overwrite_output_grad=u % 2 == 1, **offload_args(offload))
    grads = torch.autograd.grad(out, [x, *params], shard(dout).to(dtype))  # a fresh gradient: scratch
    errors = {"out": rel_error(out, shard(ref_out)), "dx": rel_error(grads[0], shard(ref_grads[0]))}
    names = [n for n, t in zip(("dW", "db", "dnorm_w", "dnorm_b"), given) if t is not None]
    for name, g, e in zip(names, grads[1:], ref_grads[1:]):  # each rank: its tokens' share
        total = g.double().clone()
        dist.all_reduce(total, group=group)
        errors[name] = rel_error(total, e)
    return errors


def residency_peaks(group, world_size, num_chunks, offload):
    """Peak chunks per kind on the device during forward and during backward."""
    seq = world_size * num_chunks * SUB_CHUNK
    q = torch.randn(seq // world_size, BATCH, 4, HEAD_DIM)
    k, v = torch.randn_like(q), torch.randn_like(q)
    plan = make_plan(q, k, v, sp_group=group, num_chunks=num_chunks, **offload_args(offload))
    state = AttentionState(plan, q.device)
    out = fpdt_forward(q, k, v, plan, state)
    forward_peak = dict(state.residency.peak)
    state.residency.reset_peak()
    fpdt_backward(torch.randn_like(out), plan, state, kv_heads=4)
    return forward_peak, dict(state.residency.peak), dict(state.residency.current)


def no_grad_forward(group, world_size, num_chunks=4):
    """Without a backward to come, the forward keeps no query/output chunks and frees its KV
    chunks before returning; its output is the same as with autograd."""
    seq = world_size * num_chunks * SUB_CHUNK
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(seq // world_size, BATCH, 4, HEAD_DIM, generator=gen).requires_grad_()
    k, v = (torch.randn(seq // world_size, BATCH, 2, HEAD_DIM, generator=gen) for _ in range(2))
    with_grad = fpdt_attention(q, k, v, sp_group=group, num_chunks=num_chunks)
    with torch.no_grad():
        without = fpdt_attention(q, k, v, sp_group=group, num_chunks=num_chunks)
    plan = make_plan(q, k, v, sp_group=group, num_chunks=num_chunks)
    state = AttentionState(plan, q.device, for_backward=False)
    with torch.no_grad():
        fpdt_forward(q, k, v, plan, state)
    return dict(same=torch.equal(with_grad.detach(), without), peak=dict(state.residency.peak),
                requires_grad=without.requires_grad)


def bad_input_errors(group, world_size):
    """Bad inputs must raise before any collective: collectives are made to fail here."""
    def no_comm(*args, **kwargs):
        raise AssertionError("communication before input validation")

    saved = dist.all_to_all_single
    dist.all_to_all_single = no_comm
    messages = {}
    try:
        s, b, d = 4 * world_size * 2, 2, 8
        bad = {
            "indivisible_chunks": (torch.randn(s + 1, b, 4, d),) * 3 + (4,),
            "heads_not_divisible_by_sp": (torch.randn(s, b, 3, d),) * 3 + (1,),
            "kv_heads_not_dividing": (torch.randn(s, b, 4, d), torch.randn(s, b, 3, d), torch.randn(s, b, 3, d), 1),
            "shape_mismatch": (torch.randn(s, b, 4, d), torch.randn(s - 1, b, 4, d), torch.randn(s - 1, b, 4, d), 1),
            "dtype_mismatch": (torch.randn(s, b, 4, d), torch.randn(s, b, 4, d, dtype=torch.float64),
                               torch.randn(s, b, 4, d), 1),
            "not_4d": (torch.randn(s, b, 4 * d),) * 3 + (1,),
        }
        for name, (q, k, v, u) in bad.items():
            if name == "heads_not_divisible_by_sp" and world_size == 1:
                continue
            try:
                fpdt_attention(q, k, v, sp_group=group, num_chunks=u)
                messages[name] = None
            except ValueError as e:
                messages[name] = str(e)
        layout = QKVLayout(4 * world_size, 2 * world_size, d)
        w = torch.randn(layout.width, 16)
        for name, (x, weight, u) in {"qkv_weight_shape": (torch.randn(s, b, 16), w[1:], 1),
                                     "qkv_indivisible_chunks": (torch.randn(s + 1, b, 16), w, 4)}.items():
            try:
                fpdt_qkv_attention(x, weight, None, layout, sp_group=group, num_chunks=u)
                messages[name] = None
            except ValueError as e:
                messages[name] = str(e)
    finally:
        dist.all_to_all_single = saved
    return messages


def all_to_all_errors(rank, world_size, group):
    """seq_to_head of local chunk i must give global span i for this rank's heads; head_to_seq inverts it."""
    errors = []
    num_chunks, sub, b, heads, d = 3, 2, 2, 4 * world_size, 3
    seq = world_size * num_chunks * sub
    full = torch.arange(seq * b * heads * d, dtype=torch.float32).view(seq, b, heads, d)
    local = fpdt_shard(full, dim=0, sp_rank=rank, sp_size=world_size, num_chunks=num_chunks)
    span, hl = seq // num_chunks, heads // world_size
    for async_op in (False, True):
        for i in range(num_chunks):
            chunk = local[i * sub:(i + 1) * sub]
            got = seq_to_head(chunk, group, async_op=async_op).wait()  # [b, P*c, H/P, d]
            want = full[i * span:(i + 1) * span, :, rank * hl:(rank + 1) * hl].transpose(0, 1)
            if not torch.equal(got, want):
                errors.append(f"seq_to_head chunk {i} async={async_op}")
            back = head_to_seq(got, group, async_op=async_op).wait()
            into = torch.empty_like(chunk)
            head_to_seq(got, group, out=into, async_op=async_op).wait()
            if not (torch.equal(back, chunk) and torch.equal(into, chunk)):
                errors.append(f"head_to_seq chunk {i} async={async_op}")
    return errors


def world_worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    report = {"cases": {}, "residency": {}, "bad": bad_input_errors(group, world_size),
              "comm": all_to_all_errors(rank, world_size, group), "no_grad": no_grad_forward(group, world_size)}
    for case in case_list(world_size):
        report["cases"][case_id(case)] = run_case(rank, world_size, case, group)
    report["qkv"] = {qkv_case_id(c): run_qkv_case(rank, world_size, c, group) for c in qkv_case_list(world_size)}
    for offload in (False, True, "disk"):
        report["residency"][offload] = residency_peaks(group, world_size, 8, offload)
    return report


@functools.lru_cache(maxsize=None)
def world_report(world_size):
    return run_world(world_size, world_worker)


ALL_CASES = [(w, c) for w in WORLD_SIZES for c in case_list(w)]


@pytest.mark.parametrize("world_size,case", ALL_CASES, ids=[f"sp{w}-{case_id(c)}" for w, c in ALL_CASES])
def test_matches_float64_reference(world_size, case):
    _assert_within_tolerance(world_size, "cases", case_id(case), TOLERANCE[case[3]])


def _assert_within_tolerance(world_size, section, name, tolerance):
    for rank, report in enumerate(world_report(world_size)):
        errors = report[section][name]
        worst = max(errors, key=errors.get)
        assert errors[worst] <= tolerance, f"rank {rank}: {worst} rel error {errors[worst]:.2e} > {tolerance:.0e}; {errors}"


QKV_CASES = [(w, c) for w in WORLD_SIZES for c in qkv_case_list(w)]


@pytest.mark.parametrize("world_size,case", QKV_CASES, ids=[f"sp{w}-{qkv_case_id(c)}" for w, c in QKV_CASES])
def test_qkv_attention_matches_float64_reference(world_size, case):
    """Projection + rotary + attention: output and the gradients of x, W and b."""
    _assert_within_tolerance(world_size, "qkv", qkv_case_id(case), TOLERANCE[case[3]])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_to_all_follows_the_layout(world_size):
    for rank, report in enumerate(world_report(world_size)):
        assert report["comm"] == [], f"rank {rank}: {report['comm']}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_offload_bounds_device_residency(world_size):
    for report in world_report(world_size):
        for where in (True, "disk"):
            fwd, bwd, after = report["residency"][where]
            assert fwd["kv"] <= 2, f"forward kept {fwd['kv']} KV chunks on the device ({where})"
            assert all(n <= 2 for n in bwd.values()), f"backward residency {bwd} ({where})"
            assert all(n == 0 for n in after.values()), f"chunks left on the device after backward: {after}"
        fwd_resident, _, _ = report["residency"][False]
        assert fwd_resident["kv"] == 8, "without offload every KV chunk stays resident"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_forward_without_grad_stores_nothing_for_backward(world_size):
    for report in world_report(world_size):
        no_grad = report["no_grad"]
        assert no_grad["same"], "the no_grad forward differs from the autograd one"
        assert not no_grad["requires_grad"]
        assert no_grad["peak"].get("qo", 0) == 0, f"query/output chunks stored: {no_grad['peak']}"
        assert no_grad["peak"]["kv"] == 4, no_grad["peak"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bad_inputs_fail_before_communication(world_size):
    for report in world_report(world_size):
        for name, message in report["bad"].items():
            assert message is not None, f"{name} was accepted"
    messages = world_report(world_size)[0]["bad"]
    assert "multiple of fpdt_parallel_size*num_chunks" in messages["indivisible_chunks"]
    assert "num_query_groups" in messages["kv_heads_not_dividing"]
    assert "sequence length" in messages["shape_mismatch"]
    assert "dtype" in messages["dtype_mismatch"]
    assert "QKV weight must be" in messages["qkv_weight_shape"]
    assert "multiple of fpdt_parallel_size*num_chunks" in messages["qkv_indivisible_chunks"]
