"""One training step, FPDT against the baseline, at growing sequence lengths.

    python bench/train_step.py                         # CPU: a small Llama, 2 processes each
    python bench/train_step.py --seq-lens 2048 4096 8192 --plot bench_train_step.png

Both setups train the same model (same configuration) on the same number of processes:
FPDT (``--fpdt``, FPDT size = processes, chunked; offload on CUDA only: on the
CPU the host is the same RAM, so offloading would only add copies) and the baseline,
megatron-core's standard spec on the same processes with tensor parallelism
(the layout megatron-core offers there without FPDT) and its best memory
setting, full recompute; both with --use-distributed-optimizer (Adam state split
over the data x FPDT ranks, as megatron-core does; the baseline's ranks are all
TP, so nothing is split there). One warm-up step, then timed steps (forward,
backward, optimizer). Memory is per process, the larger of the ranks: on the
CPU the peak resident memory the training added to the process (parameters,
gradients, optimizer state and activations; the interpreter and libraries
excluded), on CUDA ``max_memory_allocated``. Ratios are FPDT / baseline at
the same length, from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.progress import Progress, add_progress_flag  # noqa: E402

# The benchmarks' models: Llama's architecture (RMSNorm, SwiGLU, no biases, RoPE, no dropout), with
# the vocabulary each is measured with. Fields are ModelConfig's (megatron/training/config.py).
LLAMA = dict(normalization="RMSNorm", swiglu=True, add_bias_linear=False, position_embedding_type="rope",
             attention_dropout=0.0, hidden_dropout=0.0)
MODEL = {
    # a small Llama with a real 32K vocabulary
    "llama-tiny": dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                       num_query_groups=4, untie_embeddings_and_output_weights=True),
    # a second shape, for checking tools/memory_planner.py away from the one it was calibrated on
    "llama-wide": dict(num_layers=2, hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6,
                       num_query_groups=2, untie_embeddings_and_output_weights=True),
    # the layers outweigh the embeddings (61% of the parameters; llama-tiny: 15%), as in large models
    "llama-deep": dict(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                       num_query_groups=4),
    # Llama-3.2-1B (the GPU check): tied embeddings, 1.24B parameters, as the planner's preset
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                        num_query_groups=8, kv_channels=64, rotary_base=500000.0),
}
VOCAB = {"llama-tiny": 32000, "llama-wide": 32000, "llama-deep": 32000, "llama3.2-1b": 128256}


def model_config(model: str, seq: int):
    from megatron.training.config import ModelConfig

    return ModelConfig(**MODEL[model], **LLAMA, max_position_embeddings=seq)


def setup_config(kind: str, model: str, seq: int, nproc: int, chunk: int, bf16: bool, offload: bool,
                 offload_dir: Optional[str] = None):
    """The run config of one setup: "baseline", "fpdt", "fpdt-disk" (FPDT offloading its chunks
    and checkpointed inputs to a file in ``offload_dir``, the disk tier) or "fpdt-fsdp2" (FPDT with
    parameters, gradients and optimizer state sharded by FSDP2). One sequence per step, mock data,
    full recompute, the optimizer state split over data x FPDT ranks (the baseline's ranks are all
    TP, so nothing is split there)."""
    from fpdt_ext.core.config import FPDTConfig
    from megatron.training.config import DataConfig, ParallelConfig, RunConfig, TokenizerConfig, TrainingConfig

    fpdt = kind in ("fpdt", "fpdt-disk", "fpdt-fsdp2")
    if kind == "fpdt-disk" and offload_dir is None:
        raise ValueError("the fpdt-disk setup needs a directory on a disk (offload_dir)")
    offload = fpdt and (offload or kind == "fpdt-disk")  # on the CPU the host is the same RAM: offload only copies
    directory = offload_dir if kind == "fpdt-disk" else None
    training = TrainingConfig(seq_length=seq, train_iters=100, global_batch_size=1, lr=1e-4, eval_iters=0,
                              log_interval=1000, recompute_granularity="full", offload_recompute_inputs=offload,
                              offload_dir=directory, bf16=bf16)
    fsdp = kind == "fpdt-fsdp2"
    parallel = ParallelConfig(world_size=nproc, use_distributed_optimizer=not fsdp, use_torch_fsdp2=fsdp,
                              **({"fpdt_parallel_size": nproc} if fpdt else {"tensor_model_parallel_size": nproc}))
    return RunConfig(model=model_config(model, seq), training=training, data=DataConfig(mock_data=True),
                     parallel=parallel, tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer",
                                                                  vocab_size=VOCAB[model]),
                     fpdt=FPDTConfig(fpdt_parallel_size=nproc, fpdt_chunk_size=min(chunk, seq), fpdt_offload=offload,
                                     offload_dir=directory) if fpdt else None)


def step_worker(rank, world_size, config, steps):
    """Build the trainer, warm up one step, time ``steps`` steps; report time and peak memory."""
    import torch
    import torch.distributed as dist

    from fpdt_ext import runtime
    from megatron.training.initialize import initialize
    from megatron.training.training import Trainer

    groups = initialize(config)  # groups and seeds first: the baseline memory excludes the runtime
    rt = runtime.current()
    cpu = torch.device("cpu")
    base, host_base = rt.memory_in_use_bytes(), runtime.memory_in_use_bytes(cpu)
    trainer = Trainer(config, groups=groups)
    started = time.perf_counter()
    trainer.train_step()  # warm-up: optimizer state, pools, caches
    warmup = time.perf_counter() - started
    times = []
    rt.synchronize()
    rt.reset_peak_memory()
    if rt.on_gpu:
        runtime.reset_peak_memory(cpu)
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step()
        rt.synchronize()
        times.append(time.perf_counter() - start)
    peak = rt.peak_memory_bytes() - base
    # host: what the step added to the process's resident set (pinned offload buffers among it);
    # on the CPU that is the device figure
    host = runtime.peak_memory_bytes(cpu) - host_base if rt.on_gpu else peak
    return {"seconds": statistics.median(times), "warmup_seconds": warmup, "peak_bytes": peak,
            "peak_host_bytes": host, "peak_disk_bytes": trainer.memory.peak_disk_bytes()}


def measure(kind, model, seq, nproc, chunk=2048, steps=1, bf16=False, offload=None, timeout=3600,
            offload_dir=None):
    """One setup at one length: median step seconds (slowest rank) and peak bytes (largest rank).
    FPDT offloads (chunks and checkpointed inputs) on CUDA; on the CPU, where host and device are
    the same RAM, it does not unless ``offload`` says so. "fpdt-disk" offloads to a file in
    ``offload_dir`` (and reports the file's peak, the larger rank)."""
    from bench.memory import malloc_env
    from fpdt_ext import runtime
    from fpdt_ext.testing.spawn import run_world

    malloc_env()
    offload = runtime.Runtime.detect().cuda if offload is None else offload
    config = setup_config(kind, model, seq, nproc, chunk, bf16, offload, offload_dir)
    try:
        per_rank = run_world(nproc, step_worker, config, steps, timeout=timeout, start_method="spawn")
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            return {"kind": kind, "seq": seq, "oom": True}
        raise
    result = {"kind": kind, "seq": seq, "nproc": nproc, "oom": False,
              "seconds": max(r["seconds"] for r in per_rank), "peak_bytes": max(r["peak_bytes"] for r in per_rank),
              "peak_host_bytes": max(r["peak_host_bytes"] for r in per_rank),
              "warmup_seconds": max(r["warmup_seconds"] for r in per_rank),
              "tokens_per_s": seq / max(r["seconds"] for r in per_rank)}
    if kind == "fpdt-disk":
        result["peak_disk_bytes"] = max(r["peak_disk_bytes"] for r in per_rank)
    return result


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("baseline", "o-"), ("fpdt", "s-"), ("fpdt-disk", "^-"), ("fpdt-fsdp2", "d-")):
        rows = sorted((r for r in results if r["kind"] == kind and not r.get("oom")), key=lambda r: r["seq"])
        if not rows:
            continue
        ax_mem.plot([r["seq"] for r in rows], [r["peak_bytes"] / 2**30 for r in rows], style, label=kind)
        ax_time.plot([r["seq"] for r in rows], [r["seconds"] for r in rows], style, label=kind)
    for ax, label in ((ax_mem, "peak memory per process (GiB)"), (ax_time, "step time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(results):
    print(f"{'seq':>8}  {'setup':<9} {'step s':>9} {'tokens/s':>9} {'peak MiB':>9} {'time x':>7} {'mem x':>7}")
    for seq in sorted({r["seq"] for r in results}):
        rows = {r["kind"]: r for r in results if r["seq"] == seq}
        base = rows.get("baseline")
        for kind in ("baseline", "fpdt", "fpdt-disk", "fpdt-fsdp2"):
            r = rows.get(kind)
            if r is None:
                continue
            if r.get("oom"):
                print(f"{seq:>8}  {kind:<9} {'out of memory':>28}")
                continue
            ratio = base and not base.get("oom")
            print(f"{seq:>8}  {kind:<9} {r['seconds']:>9.3f} {r['tokens_per_s']:>9.0f} {r['peak_bytes'] / 2**20:>9.1f} "
                  f"{(r['seconds'] / base['seconds']) if ratio else float('nan'):>7.2f} "
                  f"{(r['peak_bytes'] / base['peak_bytes']) if ratio else float('nan'):>7.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL), default="llama-tiny")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=1024, help="FPDT tokens per global chunk")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--plot", default=None, help="write a PNG of memory and time against length")
    p.add_argument("--out", default=None, help="write the raw results as JSON")
    add_progress_flag(p)
    a = p.parse_args(argv)
    results = []
    with Progress(2 * len(a.seq_lens), "train_step", unit="run", enabled=not a.no_progress) as bar:
        for seq in a.seq_lens:
            for kind in ("baseline", "fpdt"):
                results.append(measure(kind, a.model, seq, a.nproc, a.chunk_size, a.steps, a.bf16))
                bar.print(json.dumps(results[-1]))
                bar.update(seq=seq, setup=kind)
    print(f"# one training step, {a.model}, {a.nproc} processes, FPDT chunk {a.chunk_size}; baseline: TP "
          f"{a.nproc} + full recompute")
    print_table(results)
    if a.plot:
        plot(results, a.plot)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
