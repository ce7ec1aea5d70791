"""fpdt_attention against torch's SDPA on the full sequence: time and peak memory.

One forward+backward of causal attention per measurement. The baseline is
``torch.nn.functional.scaled_dot_product_attention`` on the whole sequence in
one process (on CPU it runs torch's flash kernel). FPDT runs on 1 rank (chunked,
optionally offloaded) and on 2 ranks (FPDT size 2, gloo). Every number is
printed as a ratio to the baseline measured in the same run at the same length.

    python bench/attention.py                      # 4K..32K, the full table
    python bench/attention.py --quick              # 2K and 4K, a minute or two

Memory is the peak the step added to the process (see bench/memory.py), host
buffers included; with 2 ranks it is the larger of the two. On the CPU the
"host" that offload copies to is the same RAM, so offload cannot lower these
numbers here; what it bounds is the number of chunks resident on the compute
device (see the tests), which is what matters on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.memory import PeakMemory, malloc_env  # noqa: E402
from fpdt_ext import fpdt_attention  # noqa: E402
from fpdt_ext.testing.spawn import run_world  # noqa: E402
from tools.progress import Progress, add_progress_flag  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sdpa_step(q, k, v, dout):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), is_causal=True
    ).permute(2, 0, 1, 3)  # [s, b, h, d]
    out.backward(dout)


def _fpdt_step(group, num_chunks, offload):
    def step(q, k, v, dout):
        fpdt_attention(q, k, v, sp_group=group, num_chunks=num_chunks, offload=offload).backward(dout)
    return step


def worker(rank, world_size, setups, seq_lens, heads, head_dim, dtype_name, repeats, progress=False):
    group = dist.group.WORLD if world_size > 1 else None
    dtype = DTYPES[dtype_name]
    results = []
    bar = Progress(len(seq_lens) * len(setups), f"attention, {world_size} rank{'s' * (world_size > 1)}",
                   unit="setup", enabled=progress, rank=rank)
    for seq in seq_lens:
        for setup in setups:
            kind, num_chunks, offload = setup
            step = _sdpa_step if kind == "sdpa" else _fpdt_step(group, num_chunks, offload)
            local = seq // world_size
            q, k, v = (torch.randn(local, 1, heads, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
            dout = torch.randn(local, 1, heads, head_dim, dtype=dtype)

            def run():
                step(q, k, v, dout)
                for t in (q, k, v):
                    t.grad = None

            run()  # warm-up
            times = []
            for _ in range(repeats):
                if group is not None:
                    dist.barrier(group)
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            # each direct call offloads into its own host buffers (private MemoryTiers), so the
            # measured call's buffers count: on the CPU they are the same RAM
            with PeakMemory() as mem:
                run()
            results.append(dict(seq=seq, kind=kind, ranks=world_size, num_chunks=num_chunks, offload=offload,
                                seconds=statistics.median(times), peak_bytes=mem.peak_bytes))
            bar.update(seq=seq, setup=label(results[-1]))
    bar.close()
    return results


def label(r):
    if r["kind"] == "sdpa":
        return "torch SDPA, 1 process"
    return f"FPDT {r['ranks']} rank{'s' if r['ranks'] > 1 else ''}, u={r['num_chunks']}" + (
        ", offload" if r["offload"] else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-two-ranks", action="store_true", help="skip the 2-process runs")
    parser.add_argument("--quick", action="store_true", help="2K and 4K, chunks 1 and 4, one repeat")
    parser.add_argument("--out", help="write the raw results as JSON here")
    add_progress_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.chunks, args.repeats = [2048, 4096], [1, 4], 1
    for seq in args.seq_lens:
        for u in args.chunks:
            if seq % (2 * u):
                parser.error(f"--seq-lens {seq} is not divisible by 2*chunks {2 * u}")
    malloc_env()

    common = (args.seq_lens, args.heads, args.head_dim, args.dtype, args.repeats, not args.no_progress)
    one_rank = [("sdpa", 1, False)] + [("fpdt", u, False) for u in args.chunks]
    one_rank.append(("fpdt", max(args.chunks), True))
    print(f"# attention fwd+bwd, b=1, heads={args.heads}, head_dim={args.head_dim}, {args.dtype}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}", flush=True)
    results = run_world(1, worker, one_rank, *common, timeout=24 * 3600, start_method="spawn")[0]
    if not args.no_two_ranks:
        two_ranks = [("fpdt", u, False) for u in args.chunks if u > 1] + [("fpdt", max(args.chunks), True)]
        per_rank = run_world(2, worker, two_ranks, *common, timeout=24 * 3600, start_method="spawn")
        for r0, r1 in zip(*per_rank):  # the slower rank and the larger peak
            results.append(dict(r0, seconds=max(r0["seconds"], r1["seconds"]),
                                peak_bytes=max(r0["peak_bytes"], r1["peak_bytes"])))

    print(f"{'seq':>6}  {'setup':<32} {'time s':>8} {'x SDPA':>7} {'peak MiB':>9} {'x SDPA':>7}")
    for seq in args.seq_lens:
        rows = [r for r in results if r["seq"] == seq]
        base = next(r for r in rows if r["kind"] == "sdpa")
        for r in rows:
            print(f"{seq:>6}  {label(r):<32} {r['seconds']:>8.3f} {r['seconds'] / base['seconds']:>7.2f} "
                  f"{r['peak_bytes'] / 2**20:>9.1f} {r['peak_bytes'] / max(base['peak_bytes'], 1):>7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
