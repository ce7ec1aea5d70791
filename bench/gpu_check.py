"""The phases of the GPU check; bench/gpu_check.sh runs each under its own timeout.

    python bench/gpu_check.py PHASE --jsonl results.jsonl [--tiny] [--budget-s S]

Every phase appends JSON lines ``{"phase": PHASE, ...}`` to ``--jsonl`` as it produces them,
so a phase cut short, or a later phase that fails, leaves the earlier results. Phases, in the
order the script runs them (the cheap ones that say most first):

    env         torch, CUDA, the card, host memory, megatron-core, optional kernels
    ceilings    measured bf16 matmul TFLOP/s; pinned host->device and device->host GB/s
    kernels     every block-attention backend at Llama-3.2-1B's attention shape (32 query heads,
                8 KV heads, head dim 64) against a float64 reference: out, lse, dq, dk, dv; and
                the split-KV identity FPDT's loops rely on (one query block over two KV blocks,
                merged forward, backward per KV block with the merged out/lse, summed)
    attention   fpdt_attention against SDPA at 32K tokens in bf16: error (against float32 SDPA)
                and time, offload off and on
    offload     chunk round trips while the compute stream is busy; sources freed while their
                copies are in flight; checkpointed-input offload gives the same gradients
    sweep       training steps, FPDT against the baseline, Llama-3.2-1B, 32K/64K/128K, then FPDT
                alone further while time is left (bench/gpu_sweep.py)
    projection  FPDT's longest sequence projected from the sweep's device and host memory slopes,
                and the planner's per-token slope against the measured one (recalibration)

The GPU-marked tests run between ``offload`` and ``sweep`` (pytest, from the shell script).
``--tiny`` runs every phase at small shapes on whatever device there is: the CPU dry run that
the test suite does, so the check cannot rot while no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fpdt_ext import runtime  # noqa: E402
from fpdt_ext.core import kernels  # noqa: E402

GiB = 2**30
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-10}


class Recorder:
    def __init__(self, path, phase):
        self.path, self.phase = path, phase

    def __call__(self, **fields):
        row = {"phase": self.phase, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)
        return row


def read_rows(path, phase=None):
    """The results of ``phase`` (all phases if None), without the shell's end-of-phase records."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if (phase is None or r.get("phase") == phase) and "exit" not in r]


def _device(tiny):
    rt = runtime.Runtime.detect()
    return rt.device if rt.on_gpu else torch.device("cpu")


def _time(fn, device, repeats=3, warmup=1):
    """Median seconds of ``fn()`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    runtime.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runtime.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_error(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _host_memory_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


# -- env --------------------------------------------------------------------------------------


def phase_env(rec, tiny, budget_s):
    import importlib.util

    rt = runtime.Runtime.detect()
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                device=rt.device_name(), runtime_path="cuda" if rt.cuda else "cpu", backend=rt.backend,
                host_memory_bytes=_host_memory_bytes(), cpus=os.cpu_count())
    if rt.on_gpu:
        props = torch.cuda.get_device_properties(rt.device)
        info.update(device_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    for name in ("megatron.core", "flash_attn", "transformer_engine", "apex"):
        info[f"has_{name.split('.')[0]}"] = importlib.util.find_spec(name.split(".")[0]) is not None
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception as e:  # the check goes on: later phases say what needs it
        info["megatron_core"] = f"not importable: {e}"
    dtype = torch.bfloat16
    info["attention_backends_bf16"] = [b for b in kernels.BACKENDS if kernels.backend_supports(b, rt.device, dtype, 64)]
    info["gemm_path_bf16"] = kernels.gemm_path(rt.device, dtype)
    rec(**info)


# -- ceilings ---------------------------------------------------------------------------------


def phase_ceilings(rec, tiny, budget_s):
    device = _device(tiny)
    n = 256 if tiny else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = _time(lambda: a @ b, device, repeats=10 if not tiny else 3, warmup=3 if not tiny else 1)
    rec(what="matmul", dtype=str(dtype), n=n, tflops=2 * n**3 / seconds / 1e12)
    size = (8 << 20) if tiny else GiB
    pinned = device.type == "cuda"
    host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    h2d = _time(lambda: dev.copy_(host, non_blocking=True), device, repeats=5)
    d2h = _time(lambda: host.copy_(dev, non_blocking=True), device, repeats=5)
    rec(what="copy", bytes=size, pinned=pinned, h2d_gb_s=size / h2d / 1e9, d2h_gb_s=size / d2h / 1e9,
        note=None if pinned else "CPU: host and device are the same memory (a memcpy)")


# -- kernels ----------------------------------------------------------------------------------


def _reference(q, k0, v0, k1, v1, dout, scale):
    """float64: one query block over KV block 0 (all visible) and KV block 1 (causal)."""
    q, k0, v0, k1, v1, dout = (t.double().requires_grad_() if t is not dout else t.double()
                               for t in (q, k0, v0, k1, v1, dout))
    b, s, hq, d = q.shape
    hkv = k0.shape[2]
    k = torch.cat([k0, k1], 1).repeat_interleave(hq // hkv, 2)
    v = torch.cat([v0, v1], 1).repeat_interleave(hq // hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = torch.ones(s, 2 * s, dtype=torch.bool).triu_(s + 1)
    scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [b, h, s]
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)
    grads = torch.autograd.grad(out, (q, k0, v0, k1, v1), dout)
    return out.detach(), lse.detach(), grads


def phase_kernels(rec, tiny, budget_s):
    device = _device(tiny)
    hq, hkv, d, s = (4, 2, 16, 64) if tiny else (32, 8, 64, 2048)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.bfloat16, torch.float32]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(1, s, h, d, generator=gen) for h in (hq, hkv, hkv, hkv, hkv, hq)]
    scale = 1 / math.sqrt(d)
    for dtype in dtypes:
        inputs = [t.to(dtype) for t in base]  # rounded once, so the reference sees the same values
        ref_out, ref_lse, ref_grads = _reference(*inputs, scale)
        for backend in kernels.BACKENDS:
            if backend == "math" or not kernels.backend_supports(backend, device, dtype, d):
                continue
            try:
                q, k0, v0, k1, v1, dout = (t.to(device) for t in inputs)
                block = dict(scale=scale, backend=backend)
                out, lse = kernels.block_forward(q, k0, v0, causal=False, **block)
                acc = out.to(lse.dtype)
                out1, lse1 = kernels.block_forward(q, k1, v1, causal=True, **block)
                kernels.merge_into(acc, lse, out1, lse1)
                out = acc.to(dtype)
                dq0, dk0, dv0 = kernels.block_backward(dout, q, k0, v0, out, lse, causal=False, **block)
                dq1, dk1, dv1 = kernels.block_backward(dout, q, k1, v1, out, lse, causal=True, **block)
                got = dict(out=out, lse=lse, dq=dq0.float() + dq1.float(), dk0=dk0, dv0=dv0, dk1=dk1, dv1=dv1)
                want = dict(out=ref_out, lse=ref_lse, dq=ref_grads[0], dk0=ref_grads[1], dv0=ref_grads[2],
                            dk1=ref_grads[3], dv1=ref_grads[4])
                errors = {name: rel_error(got[name], want[name]) for name in want}
                seconds = _time(lambda: kernels.block_backward(dout, q, k1, v1, out, lse, causal=True, **block),
                                device, repeats=3)
                rec(backend=backend, dtype=str(dtype), shape=dict(heads=hq, kv_heads=hkv, head_dim=d, block=s),
                    errors=errors, tolerance=TOL[dtype], ok=max(errors.values()) <= TOL[dtype],
                    causal_backward_ms=1e3 * seconds)
            except Exception as e:  # one backend failing must not hide the others
                rec(backend=backend, dtype=str(dtype), ok=False, error=f"{type(e).__name__}: {e}"[:1500])


# -- attention --------------------------------------------------------------------------------


def phase_attention(rec, tiny, budget_s):
    from fpdt_ext import fpdt_attention

    device = _device(tiny)
    hq, hkv, d = (4, 2, 16) if tiny else (32, 8, 64)
    seq, chunks = (512, 4) if tiny else (32768, 4)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(seq, 1, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    dout = torch.randn(seq, 1, hq, d, generator=gen).to(dtype)

    def sdpa(q, k, v, dout):  # [s, b, h, d] -> SDPA's [b, h, s, d]; KV heads repeated (any kernel takes that)
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        g = hq // hkv
        qkv = [leaves[0]] + [t.repeat_interleave(g, dim=2) for t in leaves[1:]]
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3) for t in qkv), is_causal=True).permute(2, 0, 1, 3)
        return (out, *torch.autograd.grad(out, leaves, dout.to(device)))

    def fpdt(offload):
        def run(q, k, v, dout):
            leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
            out = fpdt_attention(*leaves, num_chunks=chunks, offload=offload)
            return (out, *torch.autograd.grad(out, leaves, dout.to(device)))
        return run

    reference = [t.cpu() for t in sdpa(q.float(), k.float(), v.float(), dout.float())]  # float32 SDPA
    setups = {"sdpa_bf16": sdpa, "fpdt": fpdt(False), "fpdt_offload": fpdt(True)}
    results = {}
    for name, fn in setups.items():
        try:
            runtime.reset_peak_memory(device)
            base = runtime.memory_in_use_bytes(device)
            got = [t.cpu() for t in fn(q, k, v, dout)]
            peak = runtime.peak_memory_bytes(device) - base
            seconds = _time(lambda: fn(q, k, v, dout), device, repeats=2 if not tiny else 1)
            results[name] = got
            rec(setup=name, seq=seq, heads=hq, kv_heads=hkv, head_dim=d, num_chunks=chunks,
                errors_vs_fp32_sdpa={n: rel_error(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, reference)},
                fwd_bwd_ms=1e3 * seconds, peak_bytes=peak)
        except Exception as e:
            rec(setup=name, seq=seq, error=f"{type(e).__name__}: {e}"[:1500])
    if "sdpa_bf16" in results:
        for name in ("fpdt", "fpdt_offload"):
            if name in results:
                errors = {n: rel_error(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), results[name],
                                                                  results["sdpa_bf16"])}
                rec(setup=f"{name}_vs_sdpa_bf16", errors=errors, ok=max(errors.values()) <= 2e-2, tolerance=2e-2)


# -- offload ----------------------------------------------------------------------------------


def phase_offload(rec, tiny, budget_s):
    from torch.utils.checkpoint import checkpoint

    from fpdt_ext.memory.offload import ChunkStore, Residency
    from fpdt_ext.memory.saved import SavedTensorsToHost

    device = _device(tiny)
    numel = (1 << 16) if tiny else (16 << 20)  # 64 MiB float32 chunks on GPU
    n_chunks = 6
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randn(numel, generator=gen).to(device) for _ in range(n_chunks)]
    sums = [c.double().sum().item() for c in chunks]
    m = 256 if tiny else 4096
    load = torch.randn(m, m, device=device)

    def busy(iterations):
        x = load
        for _ in range(iterations):
            x = (x @ load).mul_(1.0 / m)
        return x

    iters = 2 if tiny else 20
    compute_s = _time(lambda: busy(iters), device, repeats=1)

    def round_trips():
        store = ChunkStore("kv", device, offload=True, residency=Residency())
        busy(iters)  # queued on the compute stream; the copies run on the side stream meanwhile
        for i, c in enumerate(chunks):
            store.put(i, (c,))
            store.release(i)
        store.prefetch(0)
        got = []
        for i in range(n_chunks):
            (t,) = store.get(i)
            if i + 1 < n_chunks:
                store.prefetch(i + 1)
            got.append(t.double().sum().item())
            store.release(i)
        store.close()
        return got

    got = round_trips()
    both_s = _time(round_trips, device, repeats=1)
    copy_bytes = 2 * n_chunks * numel * 4
    rec(test="round trips under load", ok=got == sums, chunks=n_chunks, chunk_bytes=numel * 4,
        compute_only_s=compute_s, compute_and_copies_s=both_s,
        copies_hidden_fraction=max(0.0, min(1.0, 1 - (both_s - compute_s) / max(both_s, 1e-9))),
        copy_gb=copy_bytes / 1e9)

    # sources dropped right after put: their memory must not be reused before the copy read it
    store = ChunkStore("kv", device, offload=True, residency=Residency())
    expected = []
    for i in range(n_chunks):
        src = torch.randn(numel, generator=gen).to(device)
        expected.append(src.double().sum().item())
        busy(1)
        store.put(i, (src,))
        store.release(i)
        del src
        torch.full((numel,), float("nan"), device=device)  # takes the freed block if it were free
    got = []
    for i in range(n_chunks):
        got.append(store.get(i)[0].double().sum().item())
        store.release(i)
    store.close()
    rec(test="sources freed while copies are in flight", ok=got == expected)

    # checkpointed inputs kept on the host give bit-identical gradients
    torch.manual_seed(3)
    width = 64 if tiny else 2048
    layers = [torch.nn.Linear(width, width).to(device) for _ in range(4)]
    x = torch.randn(256 if tiny else 8192, width, device=device)

    def grads(offload):
        for layer in layers:
            layer.zero_grad()
        h = x.clone().requires_grad_()
        ctx = SavedTensorsToHost(min_bytes=0) if offload else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t)
        with ctx:
            y = h
            for layer in layers:
                # reentrant, as megatron-core's: its saved inputs go through the hooks
                y = checkpoint(lambda t, layer=layer: torch.nn.functional.gelu(layer(t)), y, use_reentrant=True)
        y.square().sum().backward()
        return [h.grad.clone()] + [p.grad.clone() for layer in layers for p in layer.parameters()]

    same = all(torch.equal(a, b) for a, b in zip(grads(False), grads(True)))
    rec(test="checkpointed-input offload gradients", ok=same)


# -- sweep ------------------------------------------------------------------------------------


def phase_sweep(rec, tiny, budget_s):
    from bench.gpu_sweep import sweep

    ceilings = [r for r in read_rows(rec.path, "ceilings") if r.get("what") == "matmul"]
    ceiling = ceilings[-1]["tflops"] if ceilings else None
    if tiny:
        # long enough that the CPU's resident-set growth (~8 KB a token here) stands well above its
        # noise of a few MB: shorter sweeps gave a flat or negative fit on a loaded machine
        sweep("llama-tiny", [1024, 2048], 256, budget_s, 4096, rec.path, ceiling, bf16=False)
    else:
        sweep("llama3.2-1b", [32768, 65536, 131072], 16384, budget_s, 1 << 19, rec.path, ceiling)


# -- projection -------------------------------------------------------------------------------


def _fit(points):
    """Least-squares line through (x, y) points: (slope, intercept)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def phase_projection(rec, tiny, budget_s):
    from tools.memory_planner import PRESETS, Model, Plan

    env = (read_rows(rec.path, "env") or [{}])[-1]
    rows = [r for r in read_rows(rec.path, "sweep") if r.get("kind") == "fpdt" and "seconds" in r]
    if len(rows) < 2:
        rec(ok=False, note=f"{len(rows)} FPDT sweep row(s): a projection needs two lengths")
        return
    model_name, chunk = rows[0]["model"], rows[0]["chunk_size"]
    device_points = [(r["seq"], r["peak_bytes"]) for r in rows]
    host_points = [(r["seq"], r["peak_host_bytes"]) for r in rows]
    dev_slope, dev_icept = _fit(device_points)
    host_slope, host_icept = _fit(host_points)
    device_total = env.get("device_memory_bytes") or env.get("host_memory_bytes")
    host_total = env.get("host_memory_bytes")
    margin = 0.9  # allocator fragmentation, the CUDA context
    limits = {}
    if dev_slope > 0 and device_total:
        limits["device"] = (margin * device_total - dev_icept) / dev_slope
    if host_slope > 0 and host_total and env.get("device_memory_bytes"):
        limits["host"] = (margin * host_total - host_icept) / host_slope
    binding = min(limits, key=limits.get) if limits else None
    longest = int(limits[binding] // chunk * chunk) if binding else None
    projected_step = None
    if longest:  # step time ~ a*S + b*S^2 (attention quadratic), a, b >= 0, from the two longest runs
        (s1, t1), (s2, t2) = [(r["seq"], r["seconds"]) for r in rows][-2:]
        b = max(0.0, (t2 / s2 - t1 / s1) / (s2 - s1))
        a = max(0.0, t2 / s2 - b * s2)
        projected_step = a * longest + b * longest**2
    # the planner at the measured lengths: its per-token device slope against the measured one
    preset = model_name if model_name in PRESETS else None
    planner = None
    if preset:
        on_gpu = bool(env.get("device_memory_bytes"))
        plan = Plan(Model(*PRESETS[preset]), gpus=1, fpdt=1, chunk_size=chunk, device="cuda" if on_gpu else "cpu")
        predicted = [(s, plan.totals(s)[0]) for s, _ in device_points]
        planned_slope, _ = _fit(predicted)
        h_bytes = plan.model.hidden * plan.act_bytes
        phase = plan.peak_phase(device_points[-1][0])
        planner = dict(predicted_bytes=dict(predicted), measured_bytes=dict(device_points),
                       planned_slope=planned_slope, measured_slope=dev_slope,
                       slope_ratio=dev_slope / planned_slope if planned_slope else None, peak_phase=phase)
        if phase == "layer backward":  # the layer working set is the planner's fitted constant there
            kind = "fpdt"
            planner["suggested_layer_working_units"] = plan.LAYER_WORKING[kind] + (dev_slope - planned_slope) / h_bytes
    rec(model=model_name, chunk_size=chunk, device_slope_bytes_per_token=dev_slope,
        device_intercept_bytes=dev_icept, host_slope_bytes_per_token=host_slope, host_intercept_bytes=host_icept,
        limits_tokens={k: int(v) for k, v in limits.items()}, binding=binding, projected_longest_tokens=longest,
        projected_step_s=projected_step, planner=planner)


PHASES = {"env": phase_env, "ceilings": phase_ceilings, "kernels": phase_kernels, "attention": phase_attention,
          "offload": phase_offload, "sweep": phase_sweep, "projection": phase_projection}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=list(PHASES))
    p.add_argument("--jsonl", required=True)
    p.add_argument("--tiny", action="store_true", help="small shapes on any device (the CPU dry run)")
    p.add_argument("--budget-s", type=float, default=240, help="time for the sweep")
    a = p.parse_args(argv)
    rec = Recorder(a.jsonl, a.phase)
    started = time.monotonic()
    try:
        PHASES[a.phase](rec, a.tiny, a.budget_s)
    except Exception as e:
        rec(ok=False, error=f"{type(e).__name__}: {e}"[:3000])
        raise
    finally:
        print(f"phase {a.phase}: {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
