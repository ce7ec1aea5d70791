"""FPDT against the baseline on one device at growing lengths, within a time budget and a
sequence cap; then FPDT alone further while time is left.

    python bench/gpu_sweep.py --model llama3.2-1b --seqs 32768 65536 131072 --budget-s 240 \
        --max-seq 524288 --jsonl results.jsonl

Both on one process: FPDT size 1 (chunked attention, MLP and loss, offload, full recompute
with offloaded checkpoints) against the baseline (megatron-core's standard spec, full
recompute), bf16 on CUDA. Each row (step time, tokens/s, TFLOP/s, MFU against the device's
nominal peak and, with ``--ceiling-tflops``, against a measured bf16 matmul ceiling, peak device
and host memory) is appended to ``--jsonl`` as soon as it is measured, so a run cut short keeps
what it measured. A length is tried only if the previous one's cost, scaled by the growth of
attention's quadratic term, fits in the time left; a setup that ran out of memory is not tried
longer. Used by bench/gpu_check.sh; runs on the CPU too (small model, short lengths), which is
how the test suite keeps it working.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import MODEL, VOCAB, measure, setup_config  # noqa: E402


def _flops_per_token(model: str, seq: int) -> float:
    from megatron.training.flops import flops_per_token

    return flops_per_token(setup_config("fpdt", model, seq, 1, seq, False, False), VOCAB[model])


def _append(path, row):
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _cost_scale(seq: int, previous: int) -> float:
    """How much longer a step at ``seq`` takes than at ``previous``: between linear and quadratic."""
    ratio = seq / previous
    return ratio * (1 + ratio) / 2


def sweep(model, seqs, chunk_size, budget_s, max_seq, jsonl=None, ceiling_tflops=None, bf16=None):
    """Measure; return the rows. FPDT continues past ``seqs`` (doubling) up to ``max_seq``."""
    from fpdt_ext.runtime import Runtime
    from megatron.training.flops import device_peak_tflops

    rt = Runtime.detect()
    bf16 = rt.on_gpu if bf16 is None else bf16
    peak = device_peak_tflops()
    deadline = time.monotonic() + budget_s
    rows, alive, cost = [], {"baseline": True, "fpdt": True}, {}
    lengths = list(seqs)
    while lengths[-1] * 2 <= max_seq:
        lengths.append(lengths[-1] * 2)
    for seq in (s for s in lengths if s <= max_seq):
        for kind in ("baseline", "fpdt"):
            if not alive[kind] or (kind == "baseline" and seq not in seqs):
                continue
            last = cost.get(kind)
            left = deadline - time.monotonic()
            if last is not None and last[1] * _cost_scale(seq, last[0]) > left:
                _append(jsonl, {"phase": "sweep", "kind": kind, "seq": seq, "skipped": "time budget",
                                "left_s": round(left, 1)})
                alive[kind] = False
                continue
            started = time.monotonic()
            try:
                r = measure(kind, model, seq, 1, chunk_size, steps=1, bf16=bf16, timeout=max(left, 30))
            except RuntimeError as e:
                text = str(e)
                r = {"kind": kind, "seq": seq, "error": text[-1500:],
                     "timeout": "timed out" in text}
            elapsed = time.monotonic() - started
            r.update(phase="sweep", model=model, chunk_size=chunk_size, device=rt.device_name(),
                     wall_s=round(elapsed, 1))
            if r.get("oom") or "error" in r:
                alive[kind] = False
            else:
                tflops = _flops_per_token(model, seq) * seq / r["seconds"] / 1e12
                r.update(tflops=tflops, mfu=tflops / peak if peak else None,
                         mfu_of_measured_ceiling=tflops / ceiling_tflops if ceiling_tflops else None)
                cost[kind] = (seq, elapsed)
            rows.append(r)
            _append(jsonl, r)
        if not any(alive.values()):
            break
    return rows


def print_table(rows, model, chunk_size, device):
    print(f"\n# {model} on {device}: FPDT (size 1, chunk {chunk_size}, offload) vs baseline (full recompute)")
    print(f"{'seq':>9} {'setup':<9} {'step s':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} "
          f"{'host GiB':>9}")
    for r in rows:
        if r.get("skipped"):
            continue
        if r.get("oom") or "error" in r:
            what = "out of memory" if r.get("oom") else ("timed out" if r.get("timeout") else "error")
            print(f"{r['seq']:>9} {r['kind']:<9} {what:>43}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        print(f"{r['seq']:>9} {r['kind']:<9} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f} {r['tflops']:>8.1f} "
              f"{mfu:>6} {r['peak_bytes'] / 2**30:>9.2f} {r['peak_host_bytes'] / 2**30:>9.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL), default="llama3.2-1b")
    p.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072],
                   help="lengths run for both setups; FPDT continues by doubling up to --max-seq")
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--budget-s", type=float, default=240)
    p.add_argument("--max-seq", type=int, default=1 << 19)
    p.add_argument("--ceiling-tflops", type=float, default=None, help="measured bf16 matmul TFLOP/s, for MFU")
    p.add_argument("--jsonl", default=None, help="append each row here as it is measured")
    a = p.parse_args(argv)
    rows = sweep(a.model, a.seqs, a.chunk_size, a.budget_s, a.max_seq, a.jsonl, a.ceiling_tflops)
    from fpdt_ext.runtime import Runtime

    print_table(rows, a.model, a.chunk_size, Runtime.detect().device_name())
    ok = lambda kind: [r["seq"] for r in rows if r["kind"] == kind and "seconds" in r]
    print(f"longest: baseline {max(ok('baseline'), default=None)}, FPDT {max(ok('fpdt'), default=None)} tokens")
    return rows


if __name__ == "__main__":
    main()
