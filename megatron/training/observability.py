"""Logging to TensorBoard and Weights & Biases, and step timers, with Megatron-LM's flags and names.

The trainer calls a :class:`RunObserver` at its logging points; everything the flags decide is
here. Scalar names are Megatron-LM's (``megatron/training/training.py``'s ``training_log`` and
``evaluate_and_print_results``), each also written "vs samples" (x = consumed samples) as
Megatron-LM does, where it does:

    every --tensorboard-log-interval iterations
        lm loss, learning-rate, batch-size, grad-norm, loss-scale (unless
        --no-log-loss-scale-to-tensorboard), world-size (--log-world-size-to-tensorboard)
    every --log-interval iterations
        iteration-time (s) and throughput (TFLOP/s per device)   with --log-timers-to-tensorboard
        forward-backward-time, all-grads-sync-time, optimizer-time (s per iteration, the
        slowest rank)                                             with --log-timers-to-tensorboard
        mem-reserved-bytes, mem-allocated-bytes, mem-max-allocated-bytes, mem-allocated-count
                                                                  with --log-memory-to-tensorboard (GPU)
    at each evaluation
        lm loss validation; lm loss validation ppl (--log-validation-ppl-to-tensorboard)

Ours (not in Megatron-LM), every --log-interval iterations: tokens-per-sec, mfu (with a known
peak), mem-peak-bytes (the log line's peak memory: the allocator's peak on GPU, the resident
set's high-water mark on the CPU), fpdt/num-chunks, fpdt/offload-host-bytes (host buffers the
offload holds), fpdt/offload-disk-peak-bytes (--offload-dir).

As in Megatron-LM the writers live on the last rank. Unlike Megatron-LM, W&B gets the same
scalars with or without --tensorboard-dir (Megatron-LM writes training scalars to W&B only
when it also writes TensorBoard), and the timers are written without --timing-log-level.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import math
import os
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from fpdt_ext import runtime
from fpdt_ext.profiling import phase
from megatron.training.profiler import StepProfiler

TIMER_NAMES = ("forward-backward", "all-grads-sync", "optimizer")


def add_observability_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorBoard, Weights & Biases and profiling (Megatron-LM's flags)")
    g.add_argument("--tensorboard-dir", default=None, metavar="DIR",
                   help="write TensorBoard scalars here, with Megatron-LM's names (needs: pip install tensorboard)")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="iterations between the per-iteration scalars (lm loss, learning-rate, grad-norm, ...)")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="events held before the TensorBoard writer flushes to disk")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="also iteration-time, throughput and the forward-backward/all-grads-sync/optimizer timers "
                        "(on GPU the timers synchronise the device at their ends)")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                   action="store_false", help="do not write loss-scale")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="also the validation perplexity")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="also the CUDA allocator's statistics (mem-*-bytes; GPU only)")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true")
    g.add_argument("--wandb-project", default=None, help="log the same scalars to this W&B project (pip install "
                                                         "wandb; WANDB_MODE=offline works without network)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    g.add_argument("--wandb-save-dir", default=None, help="W&B's local files (default: SAVE/wandb with --save)")
    g.add_argument("--wandb-entity", default=None, help="the W&B team or user")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start+1 .. --profile-step-end on --profile-ranks: with "
                        "--use-pytorch-profiler a torch profiler trace, else an Nsight Systems capture range "
                        "(cudaProfilerStart/Stop and NVTX ranges; GPU only)")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks to profile")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: write a torch profiler trace (Chrome/Perfetto JSON, TensorBoard's "
                        "profile plugin) to --profile-dir, else to --tensorboard-dir")
    g.add_argument("--profile-dir", default=None, metavar="DIR",
                   help="where --use-pytorch-profiler's traces go (default: --tensorboard-dir); not a Megatron-LM flag")


@dataclasses.dataclass(frozen=True)
class ObservabilityConfig:
    """What the run writes besides its log lines; the fields are the flags above."""

    tensorboard_dir: Optional[str] = None
    tensorboard_log_interval: int = 1
    tensorboard_queue_size: int = 1000
    log_timers_to_tensorboard: bool = False
    log_loss_scale_to_tensorboard: bool = True
    log_validation_ppl_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    log_world_size_to_tensorboard: bool = False
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    wandb_entity: Optional[str] = None
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: tuple = (0,)
    use_pytorch_profiler: bool = False
    profile_dir: Optional[str] = None

    def __post_init__(self):
        for name in ("tensorboard_log_interval", "tensorboard_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.wandb_project is not None and self.wandb_save_dir is None:
            raise ValueError("--wandb-project needs --wandb-save-dir (or --save: W&B's files then go to SAVE/wandb)")
        if not self.profile:
            return
        if self.profile_step_start < 0 or self.profile_step_end <= self.profile_step_start:
            raise ValueError(f"--profile-step-end {self.profile_step_end} must be greater than --profile-step-start "
                             f"{self.profile_step_start} (>= 0): the iterations after start up to end are profiled")
        if self.use_pytorch_profiler and self.trace_dir is None:
            raise ValueError("--use-pytorch-profiler needs a directory for its trace: give --tensorboard-dir or "
                             "--profile-dir")

    @property
    def trace_dir(self) -> Optional[str]:
        return self.profile_dir or self.tensorboard_dir


def observability_config(args: argparse.Namespace) -> ObservabilityConfig:
    """The flags above as a checked config; raises ArgumentError with what to change, including
    when --tensorboard-dir or --wandb-project asks for a package that is not installed."""
    # (imported here: arguments.py imports this module to register the flags)
    from megatron.training.arguments import ArgumentError, _check_writable_dir

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ObservabilityConfig) if hasattr(args, f.name)}
    values["profile_ranks"] = tuple(values.get("profile_ranks", (0,)))
    if values.get("wandb_project") and not values.get("wandb_save_dir") and getattr(args, "save", None):
        values["wandb_save_dir"] = os.path.join(args.save, "wandb")  # Megatron-LM's default
    try:
        config = ObservabilityConfig(**values)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    for flag, directory in (("--tensorboard-dir", config.tensorboard_dir), ("--wandb-save-dir", config.wandb_save_dir),
                            ("--profile-dir", config.profile_dir)):
        problem = _check_writable_dir(f"{flag} {directory}", directory) if directory is not None else None
        if problem:  # found now, not by the last rank's writer after the model is built
            raise ArgumentError(problem)
    if config.tensorboard_dir is not None and _summary_writer_class() is None:
        raise ArgumentError("--tensorboard-dir needs the tensorboard package, which is not installed: "
                            "pip install tensorboard")
    if config.wandb_project is not None and _wandb_module() is None:
        raise ArgumentError("--wandb-project needs the wandb package, which is not installed: pip install wandb")
    if config.profile and not config.use_pytorch_profiler and not runtime.current().cuda:
        raise ArgumentError("--profile without --use-pytorch-profiler opens an Nsight Systems capture range "
                            "(cudaProfilerStart/Stop), which needs a GPU; add --use-pytorch-profiler")
    return config


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _wandb_module():
    try:
        import wandb
    except ImportError:
        return None
    return wandb


class MetricWriters:
    """TensorBoard's SummaryWriter and a W&B run, on the last rank only (as Megatron-LM); both
    optional. :meth:`scalar` writes one value to both."""

    def __init__(self, config: ObservabilityConfig, run_config: Optional[dict] = None, *, last_rank: bool = True):
        self.tensorboard = None
        self.wandb = None
        if not last_rank:
            return
        if config.tensorboard_dir is not None:
            self.tensorboard = _summary_writer_class()(log_dir=config.tensorboard_dir,
                                                       max_queue=config.tensorboard_queue_size)
        if config.wandb_project is not None:
            os.makedirs(config.wandb_save_dir, exist_ok=True)
            kwargs = dict(dir=config.wandb_save_dir, name=config.wandb_exp_name, project=config.wandb_project,
                          config=run_config or {})
            if config.wandb_entity:
                kwargs["entity"] = config.wandb_entity
            self.wandb = _wandb_module().init(**kwargs)
        if self.tensorboard is not None or self.wandb is not None:
            atexit.register(self.close)  # pending events reach the disk even when the run stops on an error

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def scalar(self, tag: str, value: float, iteration: int, samples: Optional[int] = None,
               to_wandb: bool = True) -> None:
        """``tag`` at ``iteration``; with ``samples`` also "``tag`` vs samples" at ``samples`` (TensorBoard)."""
        if value is None:
            return
        value = float(value)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, iteration)
            if samples is not None:
                self.tensorboard.add_scalar(f"{tag} vs samples", value, samples)
        if self.wandb is not None and to_wandb:
            self.wandb.log({tag: value}, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class StepTimers:
    """Wall-clock time of a step's phases, summed over the log interval. Each phase is also a
    named range in profiles. Disabled (no --log-timers-to-tensorboard), :meth:`start` and
    :meth:`stop` only open and close those ranges. On GPU a timer's end synchronises the
    device [timer-sync], so the time is the phase's, not its launches'."""

    def __init__(self, enabled: bool = False, device: Optional[torch.device] = None):
        self.enabled = enabled
        self.device = device
        self.elapsed: Dict[str, float] = dict.fromkeys(TIMER_NAMES, 0.0)
        self._started: Dict[str, float] = {}
        self._ranges: Dict[str, object] = {}

    def start(self, name: str) -> None:
        rng = phase(name)
        rng.__enter__()
        self._ranges[name] = rng
        if self.enabled:
            self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        if self.enabled:
            if self.device is not None:
                runtime.synchronize(self.device)  # [timer-sync]
            self.elapsed[name] = self.elapsed.get(name, 0.0) + time.perf_counter() - self._started.pop(name)
        self._ranges.pop(name).__exit__(None, None, None)

    def take(self, num_iterations: int) -> Dict[str, float]:
        """Seconds per iteration of each timer since the last call, the slowest rank's (a collective)."""
        names = sorted(self.elapsed)
        local = torch.tensor([self.elapsed[n] / max(num_iterations, 1) for n in names], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        self.elapsed = dict.fromkeys(names, 0.0)
        return dict(zip(names, local.tolist()))


def loss_scale_of(optimizer) -> float:
    """The optimizer's loss scale (megatron-core's mixed-precision optimizers), else 1."""
    scale = optimizer.get_loss_scale() if hasattr(optimizer, "get_loss_scale") else 1.0
    return float(scale.item() if torch.is_tensor(scale) else scale)


class RunObserver:
    """The trainer's logging points: writers, timers and the profiler of one run."""

    def __init__(self, config: ObservabilityConfig, run_config, *, timers: StepTimers, first_iteration: int,
                 memory=None):
        """``run_config``: the RunConfig (recorded in the W&B run); ``memory``: the run's
        :class:`~fpdt_ext.memory.offload.MemoryTiers`; ``first_iteration``: the iteration the
        run starts after (a resumed run's)."""
        self.config = config
        self.run_config = run_config
        self.timers = timers
        self.memory = memory
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.world_size = world
        self.writers = MetricWriters(config, _jsonable(run_config), last_rank=rank == world - 1)
        self.profiler = StepProfiler(config, rank=rank, first_iteration=first_iteration,
                                     device=runtime.current().device)

    # -- the loop's points ---------------------------------------------------------
    def before_iteration(self, iteration: int) -> None:
        """``iteration``: the one about to run (counted from 1)."""
        self.profiler.before_iteration(iteration)

    def after_iteration(self, iteration: int, *, loss: float, grad_norm: Optional[float], lr: float,
                        loss_scale: float, consumed_samples: int, global_batch_size: int) -> None:
        self.profiler.after_iteration(iteration)
        c, w = self.config, self.writers
        if not w.active or iteration % c.tensorboard_log_interval:
            return
        if w.wandb is not None:
            w.wandb.log({"samples vs steps": consumed_samples}, step=iteration)
        w.scalar("learning-rate", lr, iteration, consumed_samples)
        w.scalar("batch-size", global_batch_size, iteration, consumed_samples)
        w.scalar("lm loss", loss, iteration, consumed_samples)
        if c.log_loss_scale_to_tensorboard:
            w.scalar("loss-scale", loss_scale, iteration, consumed_samples)
        if c.log_world_size_to_tensorboard:
            w.scalar("world-size", self.world_size, iteration, consumed_samples)
        if grad_norm is not None:
            w.scalar("grad-norm", grad_norm, iteration, consumed_samples)

    def at_log_interval(self, iteration: int, metrics: dict, num_iterations: int) -> None:
        """``metrics``: what the log line printed (the trainer's dict); every rank calls this (the
        timers' maximum over ranks is a collective)."""
        c, w = self.config, self.writers
        timers = self.timers.take(num_iterations) if self.timers.enabled else {}
        if not w.active:
            return
        if c.log_timers_to_tensorboard:
            w.scalar("iteration-time", metrics["ms_per_iter"] / 1e3, iteration)
            w.scalar("throughput", metrics["tflops_per_device"], iteration)
            for name, seconds in timers.items():
                w.scalar(f"{name}-time", seconds, iteration)
        if c.log_memory_to_tensorboard and torch.cuda.is_available() and runtime.current().on_gpu:
            stats = torch.cuda.memory_stats(runtime.current().device)
            for tag, key in (("mem-reserved-bytes", "reserved_bytes.all.current"),
                             ("mem-allocated-bytes", "allocated_bytes.all.current"),
                             ("mem-max-allocated-bytes", "allocated_bytes.all.peak"),
                             ("mem-allocated-count", "allocation.all.current")):
                w.scalar(tag, stats.get(key, 0), iteration, to_wandb=False)  # as Megatron-LM: TensorBoard only
        w.scalar("tokens-per-sec", metrics["tokens_per_s"], iteration)
        if metrics.get("mfu") is not None:
            w.scalar("mfu", metrics["mfu"], iteration)
        w.scalar("mem-peak-bytes", metrics["peak_mem_gib"] * 2**30, iteration)
        fpdt = self.run_config.fpdt
        if fpdt is not None:
            w.scalar("fpdt/num-chunks", self.run_config.fpdt_num_chunks, iteration)
            if fpdt.fpdt_offload and self.memory is not None:
                w.scalar("fpdt/offload-host-bytes", self.memory.host_bytes_allocated(), iteration)
        if self.memory is not None and self.run_config.training.offload_dir:
            w.scalar("fpdt/offload-disk-peak-bytes", self.memory.peak_disk_bytes(), iteration)

    def validation(self, iteration: int, loss: float, consumed_samples: int) -> None:
        w = self.writers
        if not w.active:
            return
        w.scalar("lm loss validation", loss, iteration, consumed_samples)
        if self.config.log_validation_ppl_to_tensorboard:
            # Megatron-LM writes the perplexity to TensorBoard only
            w.scalar("lm loss validation ppl", math.exp(min(20, loss)), iteration, consumed_samples, to_wandb=False)

    def close(self) -> None:
        self.profiler.close()
        self.writers.close()


def _jsonable(config) -> dict:
    if not dataclasses.is_dataclass(config):
        return {}
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))

