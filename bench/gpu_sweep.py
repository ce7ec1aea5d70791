"""FPDT against the baseline on one device, at growing lengths until the baseline runs out of
memory, then the longest FPDT sequence reached in the time left (doubling).

    python bench/gpu_sweep.py --model llama3.2-1b --start 32768 --budget-s 300 --out sweep.json

Both on one process: FPDT size 1 (chunked attention, MLP and loss, offload, full recompute
with offloaded checkpoints) against the baseline (megatron-core's standard spec, full
recompute), bf16 on CUDA. Reports step time, tokens/s, TFLOP/s, MFU (megatron/training/flops.py
and the device's peak) and peak device memory. Used by bench/gpu_check.sh; runs on the CPU too
(small model, short lengths) so that it is tested there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import LLAMA, MODEL, measure  # noqa: E402


def _flops_per_token(model: str, seq: int) -> float:
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.flops import flops_per_token_from_args

    args = validate_args(parse_args(MODEL[model] + LLAMA + ["--seq-length", str(seq), "--train-iters", "1",
                                                             "--mock-data"]), world_size=1)
    return flops_per_token_from_args(args, args.vocab_size)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.2-1b")
    p.add_argument("--start", type=int, default=32768)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--budget-s", type=float, default=300)
    p.add_argument("--max-seq", type=int, default=1 << 22)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch

    from megatron.training.flops import device_peak_tflops

    cuda = torch.cuda.is_available()
    peak = device_peak_tflops()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    deadline = time.time() + a.budget_s
    rows, seq, baseline_alive, last_cost = [], a.start, True, 0.0
    while seq <= a.max_seq and time.time() + 2.5 * last_cost < deadline:
        started = time.time()
        for kind in (("baseline", "fpdt") if baseline_alive else ("fpdt",)):
            r = measure(kind, a.model, seq, 1, a.chunk_size, steps=1, bf16=cuda)
            if not r.get("oom"):
                tflops = _flops_per_token(a.model, seq) * seq / r["seconds"] / 1e12
                r.update(tflops=tflops, mfu=tflops / peak if peak else None)
            else:
                baseline_alive = baseline_alive and kind != "baseline"
                if kind == "fpdt":
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    seq = a.max_seq + 1  # FPDT ran out too: stop
                    break
            rows.append(r)
            print(json.dumps(r), flush=True)
        last_cost = time.time() - started
        seq *= 2
    print(f"\n# {a.model} on {device}: FPDT (size 1, chunk {a.chunk_size}, offload) vs baseline (full recompute)")
    print(f"{'seq':>9} {'setup':<9} {'step s':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if r.get("oom"):
            print(f"{r['seq']:>9} {r['kind']:<9} {'out of memory':>43}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        print(f"{r['seq']:>9} {r['kind']:<9} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f} {r['tflops']:>8.1f} "
              f"{mfu:>6} {r['peak_bytes'] / 2**30:>9.2f}")
    fpdt = [r["seq"] for r in rows if r["kind"] == "fpdt" and not r.get("oom")]
    base = [r["seq"] for r in rows if r["kind"] == "baseline" and not r.get("oom")]
    summary = {"device": device, "model": a.model, "rows": rows,
               "baseline_longest": max(base, default=None), "fpdt_longest": max(fpdt, default=None)}
    print(f"longest: baseline {summary['baseline_longest']}, FPDT {summary['fpdt_longest']} tokens")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
