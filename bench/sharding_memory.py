"""Per-rank model state under each sharding: unsharded (megatron-core DDP, Adam state on every
rank), ZeRO-1 (--use-distributed-optimizer) and FSDP2 (--use-torch-fsdp2), FPDT over N ranks;
and, for comparison, the same N ranks as N pipeline stages (--pipeline-model-parallel-size N,
FPDT 1: each rank holds its stage's layers and one vocabulary matrix), and as 2 stages of N/2
FPDT ranks with FSDP2 (``pipeline-fsdp2``, N >= 4: each stage's share sharded N/2 ways).
``megatron-fsdp-<strategy>``: megatron-core's Megatron-FSDP (--use-megatron-fsdp, the GPU path)
run on the CPU under the CUDA-path test harness (tests/cuda_on_cpu.py); its bytes are those of
its buffers (model weights, float32 master weights, float32 gradients) and Adam's moments.

    python bench/sharding_memory.py                        # llama-tiny, FPDT 2 and 4, 2048 tokens
    python bench/sharding_memory.py --model llama-wide --nproc 2 --bf16
    python bench/sharding_memory.py --nproc 2 --microbatches 4   # gradient accumulation

After one training step, each rank counts the bytes of the tensors it holds for parameters,
gradients and optimizer state (Adam's moments and float32 master weights), and its resident
memory (VmRSS) above what it held before the model was built, and the step's peak (VmHWM above
the same point: the gathered layers, unreduced gradients and activations at their largest; with
``--microbatches M`` the step accumulates M micro batches' gradients). The expected factors (the
planner's accounting, tools/memory_planner.py): unsharded 1; ZeRO-1 divides the optimizer state
by N; FSDP2 divides all three by N; N stages hold the planner's params_per_rank at PP N over PP 1,
and 2 sharded stages that of PP 2 over N/2; Megatron-FSDP's optim divides the optimizer state by N,
optim_grads the gradients too, optim_grads_params all three, and it keeps float32 master weights
(1/N) apart from the model's weights in float32 runs too, which the expected ratio counts.
Ratios are against the unsharded run in the same invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import MODEL, setup_config  # noqa: E402

SETUPS = ("unsharded", "zero1", "fsdp2", "pipeline", "pipeline-fsdp2", "megatron-fsdp-optim",
          "megatron-fsdp-optim_grads", "megatron-fsdp-optim_grads_params")


def _rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _bytes(tensors) -> int:
    from megatron.training.sharding import local

    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


def _one_step(config):
    """(a trainer after one step, the resident bytes before its model was built)."""
    import gc

    from megatron.training.initialize import initialize
    from megatron.training.training import Trainer

    groups = initialize(config)
    gc.collect()
    before = _rss_bytes()
    trainer = Trainer(config, groups)
    trainer.train_step()
    gc.collect()
    return trainer, before


def census_worker(rank, world_size, config):
    if config.parallel.use_megatron_fsdp:
        from tests.cuda_on_cpu import cuda_path_on_cpu

        with cuda_path_on_cpu():
            return _megatron_fsdp_census(config)
    trainer, before = _one_step(config)
    module, opt = trainer.model.module, trainer.optimizer
    params = list(module.parameters())
    sharded = config.parallel.use_torch_fsdp2
    grads = [p.grad if sharded else getattr(p, "main_grad", None) for p in params]
    state = [v for s in opt.optimizer.state.values() for k, v in s.items() if k != "step"]
    masters = [m for m, p in opt._pairs if m is not p]
    return {"params": _bytes(params), "grads": _bytes(grads), "optimizer": _bytes(state) + _bytes(masters),
            "rss": _rss_bytes() - before, "peak": _rss_bytes("VmHWM") - before}


def _megatron_fsdp_census(config) -> dict:
    """The same census of Megatron-FSDP: its buffers' local storage (each rank's shard, or the whole
    buffer where the strategy does not shard it) and Adam's moments."""
    trainer, before = _one_step(config)
    buffers, seen = {"params": [], "grads": [], "optimizer": []}, set()
    for group in trainer.model.module.param_and_grad_buffer.parameter_groups:
        for kind, buffer in (("params", group.model_weight_buffer), ("optimizer", group.main_weight_buffer),
                             ("grads", group.main_grad_buffer)):
            # each buffer once (the master weights may be the model weights' buffer itself)
            if buffer is not None and buffer.data is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                buffers[kind].append(buffer.data)
    state = [v for opt in trainer.optimizer.inner_optimizers() for s in opt.state.values()
             for k, v in s.items() if k != "step"]
    return {"params": _bytes(buffers["params"]), "grads": _bytes(buffers["grads"]),
            "optimizer": _bytes(buffers["optimizer"]) + _bytes(state),
            "rss": _rss_bytes() - before, "peak": _rss_bytes("VmHWM") - before}


def measure(setup: str, model: str, seq: int, nproc: int, bf16: bool, microbatches: int = 1) -> dict:
    from fpdt_ext.testing.spawn import run_world

    config = setup_config("fpdt", model, seq, nproc, chunk=seq // 2, bf16=bf16, offload=False)
    config = dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                      global_batch_size=microbatches))
    parallel = dataclasses.replace(config.parallel, use_distributed_optimizer=setup == "zero1",
                                   use_torch_fsdp2=setup == "fsdp2")
    fpdt = config.fpdt
    if setup == "pipeline":  # the same ranks as stages, one FPDT rank each
        parallel = dataclasses.replace(parallel, fpdt_parallel_size=1, pipeline_model_parallel_size=nproc)
        fpdt = dataclasses.replace(fpdt, fpdt_parallel_size=1)
    if setup == "pipeline-fsdp2":  # 2 stages, each sharded over its N/2 FPDT ranks
        parallel = dataclasses.replace(parallel, fpdt_parallel_size=nproc // 2, pipeline_model_parallel_size=2,
                                       use_torch_fsdp2=True)
        fpdt = dataclasses.replace(fpdt, fpdt_parallel_size=nproc // 2)
    backend = None
    if setup.startswith("megatron-fsdp-"):
        from tests.cuda_on_cpu import MAPPED_BACKEND

        parallel = dataclasses.replace(parallel, use_megatron_fsdp=True,
                                       data_parallel_sharding_strategy=setup.removeprefix("megatron-fsdp-"))
        backend = MAPPED_BACKEND
    results = run_world(nproc, census_worker, dataclasses.replace(config, parallel=parallel, fpdt=fpdt),
                        backend=backend, start_method="spawn")
    return {k: max(r[k] for r in results) for k in results[0]}  # the largest rank


def _stage_share(model: str, stages: int) -> float:
    """The planner's largest stage's parameters over the whole model's (one TP rank)."""
    from tools.memory_planner import PRESETS, Model, Plan

    plan = Model(*PRESETS[model]) if model in PRESETS else None
    if plan is None:
        return float("nan")
    return Plan(plan, gpus=stages, pp=stages).params_per_rank() / Plan(plan, gpus=1).params_per_rank()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL), default="llama-tiny")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--microbatches", type=int, default=1, help="micro batches per step (gradient accumulation)")
    args = p.parse_args(argv)
    mib = 2**20
    print(f"{args.model}, {args.seq} tokens, FPDT over N ranks, {'bf16' if args.bf16 else 'fp32'}; per rank "
          f"(the largest), MiB, and the ratio to the unsharded run; {args.microbatches} micro batch(es) "
          f"per step")
    print("| N | setup | parameters | gradients | optimizer state | sum | ratio (expected) | RSS growth | step peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.nproc:
        rows = {s: measure(s, args.model, args.seq, n, args.bf16, args.microbatches) for s in SETUPS
                if s != "pipeline-fsdp2" or n >= 4}
        base = rows["unsharded"]
        total = base["params"] + base["grads"] + base["optimizer"]
        # Megatron-FSDP keeps float32 master weights apart from the model's weights in float32 runs too
        # (the unsharded fp32 run has none: its parameters are the masters); 1/N of them each
        sharded_optimizer = (base["optimizer"] + (0 if args.bf16 else base["params"])) / n
        for setup, r in rows.items():
            own = r["params"] + r["grads"] + r["optimizer"]
            expected = {"unsharded": 1.0, "zero1": (base["params"] + base["grads"] + base["optimizer"] / n) / total,
                        "fsdp2": 1.0 / n, "pipeline": _stage_share(args.model, n),
                        "pipeline-fsdp2": _stage_share(args.model, 2) / (n // 2),
                        "megatron-fsdp-optim": (base["params"] + base["grads"] + sharded_optimizer) / total,
                        "megatron-fsdp-optim_grads": (base["params"] + base["grads"] / n + sharded_optimizer) / total,
                        "megatron-fsdp-optim_grads_params": (base["params"] + base["grads"]) / n / total
                        + sharded_optimizer / total}[setup]
            print(f"| {n} | {setup} | {r['params'] / mib:.1f} | {r['grads'] / mib:.1f} | {r['optimizer'] / mib:.1f} | "
                  f"{own / mib:.1f} | {own / total:.3f} ({expected:.3f}) | {r['rss'] / mib:.0f} | "
                  f"{r['peak'] / mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
