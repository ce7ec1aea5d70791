"""The longest sequence FPDT and the baseline can train under a memory cap.

    python bench/max_seq.py                       # CPU: llama-tiny, 2 processes, 1 GiB per process
    python bench/max_seq.py --cap-gib 2 --fpdt-lens 24576 28672 32768 36864
    python bench/max_seq.py --setups fpdt-disk --offload-dir /nvme/scratch

Method (printed with the result). For each setup, one training step's peak
memory per process is measured at four or more lengths (bench/train_step.py:
the memory the training added to the process, the largest rank). Memory must
grow linearly in the sequence length (FPDT: fixed chunk size, everything else
per token; baseline: activations, logits and softmax per token): a
least-squares line is fitted and its largest relative deviation from the
points is reported; it must stay under 5%, and the slopes between
consecutive points must agree within 1.15x (a bend means the points straddle
a change of binding peak, which a 5% fit can hide). The maximum trainable length under
the cap is where the line meets it, rounded down to a multiple of the chunk
size (both, so that FPDT can run at the baseline's maximum). The baseline's maximum is then confirmed by a
direct run at that length (its peak must be under the cap), and FPDT is run at
the same length for the time-per-token ratio. The direct runs are interleaved in
rounds (baseline, fpdt, fpdt-disk, then again; three rounds by default, one timed
step after a warm-up step each): this machine's speed drifts by 10-20% over
minutes, so each round's ratio compares runs made back to back, and the ratio
reported is the median of the rounds' ratios. Longer FPDT runs are not made
on the CPU: attention time grows with the square of the length.

Three setups by default: the baseline, FPDT in RAM, and ``fpdt-disk``: FPDT with offload on and the
disk tier (``--fpdt-offload --offload-recompute-inputs --offload-dir DIR``), so the stored
attention chunks and the checkpointed layer inputs live in a file instead of RAM. On the CPU
the host is the device's RAM, so the disk is the only tier below it: ``fpdt-disk`` is the CPU's
counterpart of FPDT offloading to host memory on a GPU. Its peak is still the process's
resident memory (the file is O_DIRECT, or its pages are dropped from the page cache after each write and read);
the file's own peak is reported beside it. A fourth, ``fpdt-fsdp2`` (``--setups baseline fpdt
fpdt-fsdp2``), is FPDT in RAM with the model state sharded by FSDP2 (``--use-torch-fsdp2``)
instead of the distributed optimizer's split of the Adam state alone; it runs at FPDT's lengths.

A step has two memory peaks: the backward of the logits + loss and the
backward of one recomputed layer. The points must be measured where the
peak that binds at the maximum already dominates, or the line is straight
but wrong: for FPDT that is the layer backward, which overtakes the loss
backward near 27K tokens on llama-tiny, where the layers' norms run inside
the chunk loops (hence the default FPDT lengths, 32K-44K; with the disk tier the slope
bends near 22K tokens, a change of binding peak, hence fpdt-disk's 24K-36K;
``tools/memory_planner.py --device cpu`` names the binding phase for other
shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import measure  # noqa: E402
from fpdt_ext.runtime import Runtime  # noqa: E402
from tools.progress import Progress, add_progress_flag  # noqa: E402


SETUPS = ("baseline", "fpdt", "fpdt-disk", "fpdt-fsdp2")
DEFAULT_SETUPS = ("baseline", "fpdt", "fpdt-disk")
DISK_LENS = [24576, 28672, 32768, 36864]


def fit_line(points):
    """(intercept, slope, largest relative deviation) of a least-squares line through (x, y) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    intercept = my - slope * mx
    deviation = max(abs(intercept + slope * x - y) / y for x, y in points)
    return intercept, slope, deviation


def segment_slope_spread(points):
    """Largest / smallest slope between consecutive points: near 1 on one straight line. A
    line fitted through points on both sides of a phase change can still lie within 1% of
    them while its slope is far from the binding phase's; the spread shows the bend."""
    points = sorted(points)
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(points, points[1:])]
    return max(slopes) / min(slopes) if min(slopes) > 0 else float("inf")


def max_length(intercept, slope, cap, multiple):
    return int((cap - intercept) / slope) // multiple * multiple


def default_offload_dir() -> str:
    """A fresh directory for the disk tier under the system temp dir (refused there if it is RAM)."""
    import tempfile

    return tempfile.mkdtemp(prefix="fpdt-offload-")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--cap-gib", type=float, default=1.0, help="memory cap per process")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(DEFAULT_SETUPS),
                   help="which to measure (the baseline always): FPDT in RAM, FPDT with the disk tier, FPDT "
                        "with FSDP2 (not by default)")
    p.add_argument("--baseline-lens", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    p.add_argument("--fpdt-lens", type=int, nargs="+", default=[32768, 36864, 40960, 45056])
    p.add_argument("--disk-lens", type=int, nargs="+", default=DISK_LENS, help="lengths for fpdt-disk")
    p.add_argument("--offload-dir", default=None,
                   help="fpdt-disk's directory, on a disk (default: a fresh one under the system temp dir)")
    p.add_argument("--confirm-rounds", type=int, default=3,
                   help="rounds of direct runs at the baseline's maximum, every setup once per round; the time "
                        "ratio is the median of the rounds' ratios")
    p.add_argument("--confirm-steps", type=int, default=1, help="timed steps of each direct run (their median)")
    p.add_argument("--out", default=None)
    add_progress_flag(p)
    a = p.parse_args(argv)
    kinds = ["baseline"] + [k for k in SETUPS if k in a.setups and k != "baseline"]
    lens = {"baseline": a.baseline_lens, "fpdt": a.fpdt_lens, "fpdt-disk": a.disk_lens, "fpdt-fsdp2": a.fpdt_lens}
    if min(len(lens[k]) for k in kinds) < 4:
        p.error("measure at least four lengths for each setup")
    offload_dir = a.offload_dir or (default_offload_dir() if "fpdt-disk" in kinds else None)
    cap = a.cap_gib * 2**30
    report = {"cap_bytes": cap, "model": a.model, "nproc": a.nproc, "chunk_size": a.chunk_size, "setups": {}}
    bar = Progress(sum(len(lens[k]) for k in kinds) + a.confirm_rounds * len(kinds), "max_seq", unit="run",
                   enabled=not a.no_progress)
    for kind in kinds:
        rows = []
        for s in lens[kind]:
            rows.append(measure(kind, a.model, s, a.nproc, a.chunk_size, offload_dir=offload_dir))
            bar.print(json.dumps(rows[-1]))
            bar.update(setup=kind, seq=s)
        points = [(r["seq"], r["peak_bytes"]) for r in rows]
        intercept, slope, deviation = fit_line(points)
        report["setups"][kind] = dict(points=rows, intercept_bytes=intercept, bytes_per_token=slope,
                                      linear_fit_max_deviation=deviation,
                                      segment_slope_spread=segment_slope_spread(points),
                                      max_seq=max_length(intercept, slope, cap, a.chunk_size))
        if kind == "fpdt-disk":  # the file grows linearly too: its size at the maximum
            disk = fit_line([(r["seq"], r["peak_disk_bytes"]) for r in rows])
            report["setups"][kind]["disk_bytes_at_max"] = disk[0] + disk[1] * report["setups"][kind]["max_seq"]
    base_max = report["setups"]["baseline"]["max_seq"]
    rounds = []
    for number in range(1, a.confirm_rounds + 1):
        rounds.append({})
        for k in kinds:
            rounds[-1][k] = measure(k, a.model, base_max, a.nproc, a.chunk_size, steps=a.confirm_steps,
                                    offload_dir=offload_dir)
            bar.update(setup=k, seq=base_max, round=f"{number}/{a.confirm_rounds}")
        bar.print(json.dumps(rounds[-1]))
    bar.close()
    confirm = {k: dict(rounds[0][k], seconds=statistics.median(r[k]["seconds"] for r in rounds),
                       peak_bytes=max(r[k]["peak_bytes"] for r in rounds)) for k in kinds}
    report["confirm"], report["confirm_rounds"] = confirm, rounds
    b = report["setups"]["baseline"]
    for kind in kinds[1:]:
        ratios = [r[kind]["seconds"] / r["baseline"]["seconds"] for r in rounds]
        report["setups"][kind]["max_seq_ratio"] = report["setups"][kind]["max_seq"] / b["max_seq"]
        report["setups"][kind]["time_per_token_ratios_by_round"] = ratios
        report["setups"][kind]["time_per_token_ratio_at_baseline_max"] = statistics.median(ratios)
    print(f"\n# longest trainable sequence under {a.cap_gib:g} GiB per process, {a.model}, {a.nproc} processes "
          f"(baseline: TP {a.nproc} + full recompute; FPDT: size {a.nproc}, chunk {a.chunk_size}"
          f"{', offload' if Runtime.detect().on_gpu else ''}; fpdt-disk: chunks and checkpointed inputs "
          f"offloaded to a file on disk)")
    print("# method: peak memory of one training step at >= 4 lengths, least-squares line (deviation shown),\n"
          "#   maximum = where the line meets the cap; baseline maximum confirmed by direct runs, every setup\n"
          f"#   run there in {a.confirm_rounds} interleaved rounds; time ratio = median of the rounds' ratios")
    for kind, s in report["setups"].items():
        print(f"{kind:>9}: {s['bytes_per_token'] / 1024:8.1f} KiB/token + {s['intercept_bytes'] / 2**20:7.1f} MiB "
              f"(fit within {100 * s['linear_fit_max_deviation']:.1f}%, segment slopes within "
              f"{s['segment_slope_spread']:.2f}x) -> max {s['max_seq']} tokens"
              + (f" (offload file {s['disk_bytes_at_max'] / 2**30:.2f} GiB there)" if "disk_bytes_at_max" in s
                 else ""))
    for kind, r in confirm.items():
        by_round = ", ".join(f"{x[kind]['seconds']:.2f}" for x in rounds)
        print(f"  direct run at {base_max} tokens, {kind}: peak {r['peak_bytes'] / 2**30:.2f} GiB "
              f"({'under' if r['peak_bytes'] <= cap else 'OVER'} the cap), step {r['seconds']:.2f} s (median of "
              f"rounds: {by_round})")
    for kind in kinds[1:]:
        s = report["setups"][kind]
        by_round = ", ".join(f"{x:.2f}" for x in s["time_per_token_ratios_by_round"])
        print(f"{kind} / baseline: {s['max_seq_ratio']:.1f}x longer sequences; time per token at {base_max} "
              f"tokens: {s['time_per_token_ratio_at_baseline_max']:.2f}x (rounds: {by_round})")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1)
    for kind, s in report["setups"].items():
        if s["linear_fit_max_deviation"] > 0.05 or s["segment_slope_spread"] > 1.15:
            print(f"WARNING: {kind} memory is not linear in the length (deviation "
                  f"{100 * s['linear_fit_max_deviation']:.1f}%, segment slopes within "
                  f"{s['segment_slope_spread']:.2f}x; limits 5% and 1.15x): the points straddle a change "
                  f"of binding peak, so the extrapolated maximum is unreliable; measure longer lengths")
    return report


if __name__ == "__main__":
    main()
