"""The training loop: gradient accumulation, DDP reduction, AdamW, LR schedule,
clipping, recompute (optionally offloading checkpointed inputs), evaluation and
Megatron-style logging with throughput, TFLOP/s, MFU and peak memory.

Loss normalisation: the loss of a micro batch is the mean over its loss-masked
tokens of the whole sequence (all FPDT ranks' tokens), averaged over micro
batches. megatron-core's DDP averages gradients over data x FPDT ranks, so each
FPDT rank backpropagates ``sp_size * (its masked loss sum) / (tokens in the
sequence)``; the sum over the group is then exactly the full-sequence mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from fpdt_ext import runtime
from fpdt_ext.mcore.parallel_state import ParallelGroups
from fpdt_ext.memory.offload import MemoryTiers
from fpdt_ext.memory.saved import SavedTensorsToHost
from megatron.training import megatron_fsdp
from megatron.training.arguments import ArgumentError, parse_args, startup_notes, validate_args
from megatron.training.checkpointing import (CheckpointError, SaveLock, checkpoint_to_start_from, load_checkpoint,
                                             model_for_checkpoint, save_checkpoint)
from megatron.training.config import RunConfig
from megatron.training.data import (MicroBatches, build_datasets, largest_token_ids, to_model_layout,
                                    tokens_beyond_vocabulary)
from megatron.training.flops import device_peak_tflops, flops_per_token
from megatron.training.initialize import initialize
from megatron.training.models import build_model_chunks, padded_vocab_size
from megatron.training.observability import (ObservabilityConfig, RunObserver, StepTimers, loss_scale_of,
                                             observability_config)
from megatron.training.optimizer import build_optimizer
from megatron.training.pipeline import PipelineSchedule
from megatron.training.sharding import ShardedModel, sum_tied_embedding_grads
from megatron.training.tokenizer import build_tokenizer


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm (with --check-for-nan-in-loss-and-grad, the default)."""


class _Signal:
    """SIGTERM sets a flag; the loop saves and exits after the current iteration."""

    received = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.received = True
        _checkpoint_writer_outlives_sigterm()
        signal.signal(signal.SIGTERM, handler)  # forked children (the writer's workers) inherit it


def _checkpoint_writer_outlives_sigterm() -> None:
    """megatron-core's checkpoint writer collects its results through a multiprocessing Manager, a
    process of its own started (spawned) on first use. SIGTERM sent to the whole process group, as
    torchrun and SLURM send it, killed it, and the save that SIGTERM asks for then failed with
    BrokenPipeError. Started here with SIGTERM ignored (an ignored signal stays ignored across the
    exec of a spawned process), it outlives the signal; it ends with the run."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "_get_write_results_queue", None)  # megatron-core 0.16
    if start is None:
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        start()
    finally:
        signal.signal(signal.SIGTERM, previous)


_SIGNAL = _Signal


@dataclasses.dataclass
class RunState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    finetuned_from: Optional[str] = None  # the --load a --finetune stage started from (kept by its resumes)


def print_rank_0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


class Trainer:
    """One run: ``config`` (:class:`~megatron.training.config.RunConfig`) in, its model, optimizer,
    data and checkpoints built once; :meth:`train` runs the loop."""

    def __init__(self, config: RunConfig, groups: Optional[ParallelGroups] = None,
                 observability: Optional[ObservabilityConfig] = None):
        """``groups``: from :func:`~megatron.training.initialize.initialize` already (made here otherwise);
        ``observability``: TensorBoard, W&B, timers and profiling (default: none)."""
        self.runtime = runtime.current()
        mapped = config.parallel.use_megatron_fsdp and not self.runtime.cuda
        if mapped:  # Megatron-FSDP needs CUDA streams: the same sharding by this project's implementations
            config = dataclasses.replace(config, parallel=config.parallel.cpu_equivalent())
        self.config = config
        self.observability = observability or ObservabilityConfig()
        t = config.training
        self.groups = groups or initialize(config)
        if mapped:
            print_rank_0(f" --use-megatron-fsdp on the CPU: {describe_sharding(config.parallel)} (Megatron-FSDP "
                         f"itself runs on GPUs)")
        # claimed before anything expensive: two runs must never save into one directory
        self.save_lock = SaveLock(config.checkpoint.save) if config.checkpoint.save else None
        self.device = self.runtime.device
        self.timers = StepTimers(self.observability.log_timers_to_tensorboard, self.device)
        # where this run's offloaded tensors go: the FPDT chunks and the checkpointed layer inputs
        self.memory = MemoryTiers(t.offload_dir)
        self.tokenizer = build_tokenizer(config.tokenizer)
        if not config.data.mock_data:  # every rank reads a part of each .bin: a full check, quickly
            largest = torch.tensor(largest_token_ids(config.data.prefixes, dist.get_rank(), dist.get_world_size()))
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
            problem = tokens_beyond_vocabulary(config.data.prefixes, largest.tolist(), self.tokenizer.vocab_size)
            if problem:
                raise ArgumentError(problem)
        tp = config.parallel.tensor_model_parallel_size
        start = checkpoint_to_start_from(config.checkpoint)
        if start is None:
            if config.checkpoint.load:
                print_rank_0(f" no checkpoint in {config.checkpoint.load} yet: training starts at iteration 0")
            self.padded_vocab_size = padded_vocab_size(self.tokenizer.vocab_size,
                                                       config.model.make_vocab_size_divisible_by, tp)
        else:  # the checkpoint's shapes, checked before anything is built
            try:
                self.padded_vocab_size = model_for_checkpoint(start.common, start.path, config.model,
                                                              self.tokenizer.vocab_size, tp)
            except CheckpointError as e:  # the flags do not describe the checkpoint's model: a usage error
                raise ArgumentError(str(e)) from None
        chunks = build_model_chunks(config, self.groups, self.tokenizer.vocab_size, tiers=self.memory,
                                    padded_vocab=self.padded_vocab_size)
        # On the CPU HostAdamW splits its own state (ZeRO-1); on GPU megatron-core's distributed
        # optimizer needs DDP's buffers laid out for it.
        # --overlap-grad-reduce: buckets reduced during the last micro batch's backward (GPU only:
        # on the CPU the reduction stays in finalize_model_grads)
        if config.parallel.use_torch_fsdp2:  # parameters, gradients and optimizer state sharded (sharding.py)
            try:
                # each pipeline chunk is its own FSDP2 root
                self.models = [ShardedModel(chunk, self.groups.dp_sp, "cuda" if self.runtime.cuda else "cpu",
                                            compute_dtype=getattr(torch, config.params_dtype),
                                            reshard_after_forward=config.parallel.fsdp_reshard_after_forward,
                                            tp_group=self.groups.tp) for chunk in chunks]
            except ValueError as e:  # sizes FSDP2 cannot shard evenly: a usage error
                raise ArgumentError(str(e)) from None
        elif config.parallel.use_megatron_fsdp:  # megatron-core's Megatron-FSDP (megatron_fsdp.py; GPU path)
            self.models = megatron_fsdp.wrap(chunks, config.parallel.data_parallel_sharding_strategy, self.groups,
                                             self.device)
        else:
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=config.parallel.overlap_grad_reduce and self.runtime.cuda,
                use_distributed_optimizer=config.parallel.use_distributed_optimizer and self.runtime.cuda)
            # as Megatron-LM: one bucket set for the first virtual stage's chunk, none for the others
            self.models = [DistributedDataParallel(chunk.config, ddp_config, chunk,
                                                   pg_collection=self.groups.pg_collection, disable_bucketing=i > 0)
                           for i, chunk in enumerate(chunks)]
        self.model = self.models[0]  # the whole model without a pipeline
        self.pipeline = None if config.parallel.pipeline_model_parallel_size == 1 else PipelineSchedule(self)
        self.optimizer, self.scheduler = build_optimizer(config, self.models, self.groups)
        train_ds, valid_ds, _ = build_datasets(config, self.tokenizer)
        self.state = RunState()
        batches = dict(micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                       dp_rank=self.groups.dp_rank, dp_size=self.groups.layout.data_parallel_size)
        self.train_data = MicroBatches(train_ds, **batches)
        self.valid_data = MicroBatches(valid_ds, **batches)
        self.num_chunks = config.fpdt_num_chunks
        if start is not None:
            load_checkpoint(self, start)
        batches = t.batch_schedule
        problem = batches.indivisible(t.micro_batch_size * self.groups.layout.data_parallel_size,
                                      self.state.consumed_samples) if batches is not None else None
        if problem:  # checked from the checkpoint's position on (RunConfig checks a run from the start)
            raise ArgumentError(problem)
        self.flops_per_token = flops_per_token(config, self.tokenizer.vocab_size)
        self.peak_tflops = device_peak_tflops(t.peak_tflops)
        # the whole model's, over the pipeline stages (each rank holds its stage's)
        self.num_parameters = sum(p.numel() for c in chunks for p in c.parameters())
        if self.pipeline is not None:
            self.pipeline.setup()
            self.num_parameters = self.pipeline.total_parameters(self.num_parameters)

    # -- one micro batch ----------------------------------------------------------
    def forward(self, batch, model):
        """``model`` (the whole model, or a pipeline stage's chunk) on this rank's piece of a
        micro batch: (its output, the piece's loss mask). The output is the per-token loss
        [b, s/P] on the last stage, the hidden states on the others."""
        b = to_model_layout(batch, groups=self.groups, num_chunks=self.num_chunks, device=self.device)
        offload = (SavedTensorsToHost(self.memory) if self.config.training.offload_recompute_inputs
                   else contextlib.nullcontext())
        with offload:
            output = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return output, b["loss_mask"]

    def masked_sums(self, losses, loss_mask):
        """(masked loss sum on this rank, masked token count of the whole sequence)."""
        mask = loss_mask.float()
        tokens = mask.sum()
        if self.groups.layout.fpdt_parallel_size > 1:
            dist.all_reduce(tokens, group=self.groups.sp)
        return (losses.float() * mask).sum(), tokens

    def _loss_terms(self, batch):
        return self.masked_sums(*self.forward(batch, self.model))

    def train_step(self):
        """One iteration: (loss, gradient norm, its global batch)."""
        config = self.config
        global_batch = config.global_batch_at(self.state.consumed_samples)
        num_microbatches = config.num_microbatches_of(global_batch)
        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        sp_size = self.groups.layout.fpdt_parallel_size
        # megatron-core's mixed-precision optimizers unscale the gradients by their loss scale.
        loss_scale = self.optimizer.get_loss_scale() if hasattr(self.optimizer, "get_loss_scale") else 1.0
        self.timers.start("forward-backward")
        if self.pipeline is not None:  # megatron-core's schedule; the sums come from the last stage
            loss_sum, token_sum = self.pipeline.run(list(self.train_data.global_batch(global_batch)),
                                                    forward_only=False)
        else:
            # summed on the device: no host synchronisation per micro batch
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            token_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for i, batch in enumerate(self.train_data.global_batch(global_batch)):
                # DDP's gradient reduction may start only in the last micro batch's backward
                last = i == num_microbatches - 1
                with contextlib.nullcontext() if last else self.model.no_sync():
                    local_sum, tokens = self._loss_terms(batch)
                    (local_sum * sp_size / tokens.clamp(min=1) / num_microbatches * loss_scale).backward()
                loss_sum += local_sum.detach().double()
                token_sum += tokens.detach().double() / sp_size
        # megatron-core's gradient finalisation: the DDP reduction over data x FPDT ranks, the sums
        # over TP of replicated parameters that see only this rank's heads (q/k layernorm), and
        # under a pipeline the tied embedding's gradient between the first and last stage
        self.timers.stop("forward-backward")
        self.timers.start("all-grads-sync")
        if not config.parallel.use_torch_fsdp2:  # FSDP2 reduce-scatters each layer's gradients in backward
            finalize_model_grads(self.models, pg_collection=self.groups.pg_collection)
        else:  # the rest of megatron-core's finalisation, on the shards
            for m in self.models:
                m.finish_tp_grads()
            sum_tied_embedding_grads(self.models, self.groups.pp, self.groups.pg_collection.embd)
        self.timers.stop("all-grads-sync")
        totals = self._reported(torch.stack([loss_sum, token_sum]))
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        check = config.training.check_for_nan_in_loss_and_grad
        iteration = self.state.iteration + 1
        if not math.isfinite(loss):
            if check:  # before the optimizer step: the weights stay those of the last good step
                raise TrainingDiverged(f"the loss at iteration {iteration} is {loss}")
            self.state.nan_iterations += 1
        self.timers.start("optimizer")
        ok, grad_norm, _ = self.optimizer.step()
        self.timers.stop("optimizer")
        if ok:
            self.scheduler.step(increment=config.lr_schedule.increment(global_batch))
        else:
            self.state.skipped_iterations += 1
        if check and grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient norm at iteration {iteration} is {grad_norm}")
        self.state.iteration += 1
        self.state.consumed_samples += global_batch
        return loss, grad_norm, global_batch

    def _reported(self, totals: torch.Tensor) -> torch.Tensor:
        """[loss sum, tokens] summed over data x FPDT ranks, and under a pipeline sent from the last
        stage (the others hold zeros) to every stage."""
        dist.all_reduce(totals, group=self.groups.dp_sp)
        if self.pipeline is not None:
            dist.all_reduce(totals, group=self.groups.pp)
        return totals

    @torch.no_grad()
    def evaluate(self):
        for m in self.models:
            m.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(self.config.training.eval_iters):
            if self.pipeline is not None:
                totals += self.pipeline.run(list(self.valid_data.global_batch()), forward_only=True)
                continue
            for batch in self.valid_data.global_batch():
                local_sum, tokens = self._loss_terms(batch)
                totals += torch.stack([local_sum.double(), tokens.double() / self.groups.layout.fpdt_parallel_size])
        for m in self.models:
            m.train()
        totals = self._reported(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    # -- the loop ------------------------------------------------------------------
    def train(self):
        config, t, ckpt = self.config, self.config.training, self.config.checkpoint
        par = config.parallel
        what = f"FPDT {self.num_chunks} chunks" if config.fpdt else "baseline"
        offload = ", offload" if config.fpdt and config.fpdt.fpdt_offload else ""
        print_rank_0(f"> {self.num_parameters * par.tensor_model_parallel_size / 1e6:.2f}M parameters "
                     f"(TP shards counted once per rank x TP), world {par.world_size} = TP "
                     f"{par.tensor_model_parallel_size} x FPDT {par.fpdt_parallel_size} x PP "
                     f"{par.pipeline_model_parallel_size} x DP "
                     f"{par.data_parallel_size}; {what}{offload}{' to ' + t.offload_dir if t.offload_dir else ''}; "
                     f"seq {t.seq_length}, global batch {t.global_batch_size} ({config.num_microbatches} micro batches)"
                     + (f"; ramp-up: {t.batch_schedule.describe()}" if t.batch_schedule else ""))
        log_file = open(t.loss_log_file, "a") if t.loss_log_file and dist.get_rank() == 0 else None
        run_start = interval_start = time.perf_counter()
        interval_iters = interval_tokens = 0
        first_consumed = self.state.consumed_samples
        losses, last = [], {}
        observer = RunObserver(self.observability, config, timers=self.timers, first_iteration=self.state.iteration,
                               memory=self.memory)
        while self.state.iteration < t.train_iters:
            observer.before_iteration(self.state.iteration + 1)
            loss, grad_norm, global_batch = self.train_step()
            observer.after_iteration(self.state.iteration, loss=loss, grad_norm=grad_norm,
                                     lr=self.optimizer.param_groups[0]["lr"], loss_scale=loss_scale_of(self.optimizer),
                                     consumed_samples=self.state.consumed_samples, global_batch_size=global_batch)
            losses.append(loss)
            interval_iters += 1
            interval_tokens += global_batch * t.seq_length
            it = self.state.iteration
            if it % t.log_interval == 0 or it == t.train_iters:
                seconds = time.perf_counter() - interval_start
                elapsed = seconds / interval_iters
                tflops = self.flops_per_token * interval_tokens / seconds / par.world_size / 1e12
                last = dict(iteration=it, lm_loss=loss, grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                            global_batch_size=global_batch, consumed_samples=self.state.consumed_samples,
                            ms_per_iter=elapsed * 1e3, tokens_per_s=interval_tokens / seconds,
                            tflops_per_device=tflops, mfu=tflops / self.peak_tflops if self.peak_tflops else None,
                            peak_mem_gib=self.runtime.peak_memory_bytes() / 2**30)
                if t.offload_dir:
                    last["peak_disk_gib"] = self.memory.peak_disk_bytes() / 2**30
                self._log(last)
                observer.at_log_interval(it, last, interval_iters)
                interval_start, interval_iters, interval_tokens = time.perf_counter(), 0, 0
            exit_reason = self._exit_reason(it, run_start)
            # evaluation first: a checkpoint of this iteration holds the validation position after it
            if t.eval_iters and (it % t.eval_interval == 0 or it == t.train_iters):
                val = self.evaluate()
                print_rank_0(f" validation loss at iteration {it} | lm loss value: {val:.6E} | "
                             f"lm loss PPL: {math.exp(min(val, 20)):.6E} |")
                last["val_loss"] = val
                observer.validation(it, val, self.state.consumed_samples)
                interval_start = time.perf_counter()
            due = (ckpt.save_interval and it % ckpt.save_interval == 0) or it == t.train_iters
            if ckpt.save and (due or exit_reason):
                last["checkpoint"] = save_checkpoint(self, it)
                print_rank_0(f" saved checkpoint at iteration {it} to {last['checkpoint']}")
                interval_start = time.perf_counter()
            if log_file and last.get("iteration") == it:
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
            if exit_reason:
                print_rank_0(f" exiting at iteration {it}: {exit_reason}")
                break
        observer.close()
        if log_file:
            log_file.close()
        run_seconds = time.perf_counter() - run_start
        if not losses:
            print_rank_0(f"summary: nothing to train (at iteration {self.state.iteration} of {t.train_iters})")
            return dict(last, losses=[])
        summary = dict(last, losses=losses, first_loss=losses[0], final_loss=losses[-1],
                       mean_tokens_per_s=(self.state.consumed_samples - first_consumed) * t.seq_length / run_seconds)
        print_rank_0(f"summary: {len(losses)} iterations in {run_seconds:.0f}s | lm loss {losses[0]:.3f} -> "
                     f"{losses[-1]:.3f} | {summary['mean_tokens_per_s']:.0f} tokens/s overall"
                     + (f" | validation loss {last['val_loss']:.3f}" if "val_loss" in last else "")
                     + (f" | checkpoint: {last['checkpoint']}" if "checkpoint" in last else ""))
        return summary

    def _exit_reason(self, iteration: int, run_start: float) -> Optional[str]:
        """Why to stop after this iteration (all ranks agree), or None."""
        ckpt = self.config.checkpoint
        local = 0
        if ckpt.exit_signal_handler and _SIGNAL.received:
            local = 1
        if ckpt.exit_duration_in_mins and (time.perf_counter() - run_start) / 60 > ckpt.exit_duration_in_mins:
            local = max(local, 2)
        if ckpt.exit_signal_handler or ckpt.exit_duration_in_mins:
            flag = torch.tensor([local], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        if local == 1:
            return "SIGTERM received"
        if local == 2:
            return f"--exit-duration-in-mins {ckpt.exit_duration_in_mins} reached"
        if ckpt.exit_interval and iteration % ckpt.exit_interval == 0 and iteration < self.config.training.train_iters:
            return f"--exit-interval {ckpt.exit_interval}"
        return None

    def _log(self, m):
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
        # megatron-core's optimizers give no norm for a step skipped on overflow (fp16)
        grad_norm = f"{m['grad_norm']:.3f}" if m["grad_norm"] is not None else "n/a"
        print_rank_0(
            f" iteration {m['iteration']:8d}/{self.config.training.train_iters:8d} | consumed samples: "
            f"{self.state.consumed_samples:12d} | elapsed time per iteration (ms): {m['ms_per_iter']:.1f} | "
            f"learning rate: {m['lr']:.6E} | global batch size: {m['global_batch_size']:5d} | "
            f"lm loss: {m['lm_loss']:.6E} | grad norm: {grad_norm} | number of skipped iterations: "
            f"{self.state.skipped_iterations:3d} | number of nan iterations: {self.state.nan_iterations:3d} | "
            f"tokens/s: {m['tokens_per_s']:.0f} | TFLOP/s/device: {m['tflops_per_device']:.3f} | MFU: {mfu} | "
            f"peak mem (GiB): {m['peak_mem_gib']:.2f} |"
            + (f" peak offload file (GiB): {m['peak_disk_gib']:.2f} |" if "peak_disk_gib" in m else ""))


def describe_sharding(par) -> str:
    """What is sharded over the data x FPDT ranks, and by what."""
    ranks = par.data_parallel_size * par.fpdt_parallel_size
    if par.use_megatron_fsdp:
        what = {"optim": "the optimizer state and master weights", "optim_grads": "the optimizer state and "
                "gradients", "optim_grads_params": "parameters, gradients and optimizer state"}
        return (f"Megatron-FSDP over {ranks} data x FPDT ranks ({par.data_parallel_sharding_strategy}: "
                f"{what[par.data_parallel_sharding_strategy]})")
    if par.use_torch_fsdp2:
        return (f"FSDP2 over {ranks} data x FPDT ranks (parameters, gradients and optimizer state; "
                f"ZeRO-{3 if par.fsdp_reshard_after_forward else 2} gathers)")
    if par.use_distributed_optimizer:
        return f"the optimizer state over {ranks} data x FPDT ranks (distributed optimizer)"
    return "nothing sharded"


def describe_plan(config: RunConfig) -> str:
    """What a validated configuration will run, for --dry-run."""
    from megatron.training.flops import count_parameters
    from megatron.training.models import padded_vocab_size
    from megatron.training.tokenizer import build_tokenizer, tokenizer_files

    model, t, par = config.model, config.training, config.parallel
    vocab = build_tokenizer(config.tokenizer).vocab_size
    padded = padded_vocab_size(vocab, model.make_vocab_size_divisible_by, par.tensor_model_parallel_size)
    sp = par.fpdt_parallel_size
    lines = [
        "dry run: the configuration is valid",
        f"  world {par.world_size} = TP {par.tensor_model_parallel_size} x FPDT {sp} x PP "
        f"{par.pipeline_model_parallel_size} x DP {par.data_parallel_size}",
        f"  model: {count_parameters(model, padded) / 1e9:.2f}B parameters (L={model.num_layers}, "
        f"h={model.hidden_size}, heads {model.num_attention_heads}/kv {model.num_query_groups}, ffn "
        f"{model.ffn_hidden_size}, vocab {vocab} padded to {padded})",
        f"  batch: {t.global_batch_size} sequences of {t.seq_length} tokens = {config.num_microbatches} micro "
        f"batches of {t.micro_batch_size} per data-parallel rank",
        f"  schedule: {t.train_iters} iterations; LR {t.lr_decay_style}, warmup {config.lr_schedule.warmup_steps:g} "
        f"and decay {config.lr_schedule.decay_steps:g} {config.lr_schedule.unit}",
    ]
    if t.batch_schedule is not None:
        lines.insert(4, f"  ramp-up: {t.batch_schedule.describe()}; {config.train_samples_total} samples in all")
    if par.pipeline_model_parallel_size > 1:
        chunks = par.model_chunks
        stages = par.stage_layers(model.num_layers)
        lines.append(f"  pipeline: {par.pipeline_model_parallel_size} stages of {stages} layers; "
                     + (f"interleaved schedule, {chunks} virtual stages per rank" if chunks > 1 else
                        f"1F1B schedule, up to {min(par.pipeline_model_parallel_size, config.num_microbatches)} "
                        f"micro batches in flight on the first stage")
                     + f"; bubble {(par.pipeline_model_parallel_size - 1) / chunks / config.num_microbatches:.0%} of "
                       f"the micro batches' time")
    if par.use_torch_fsdp2 or par.use_distributed_optimizer or par.use_megatron_fsdp:
        lines.append(f"  sharding: {describe_sharding(par)}")
    if config.fpdt:
        u = config.fpdt_num_chunks
        lines.append(f"  FPDT: {t.seq_length // sp} tokens per rank in {u} chunks of {t.seq_length // u} "
                     f"tokens ({t.seq_length // u // sp} per rank); offload "
                     f"{'on' if config.fpdt.fpdt_offload else 'off'}")
    else:
        lines.append("  baseline: megatron-core GPTModel, standard spec")
    files = tokenizer_files(config.tokenizer)
    lines.append(f"  tokenizer: {config.tokenizer.tokenizer_type}" + (f" ({', '.join(files)}: found)" if files else ""))
    lines.append("  data: " + ("mock" if config.data.mock_data else " ".join(config.data.data_path)))
    return "\n".join(lines)


def pretrain(argv=None, defaults: Optional[dict] = None, description: Optional[str] = None) -> int:
    """Entry point of pretrain_*.py: parse, validate, train. Returns the exit code."""
    args = parse_args(argv, defaults=defaults, description=description)
    try:
        config = validate_args(args)
        observability = observability_config(args)
    except ArgumentError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process of the launch
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per process
        for line in startup_notes(args):
            print(line, flush=True)
    if args.dry_run:
        problem = None if config.data.mock_data else tokens_beyond_vocabulary(
            config.data.prefixes, largest_token_ids(config.data.prefixes), build_tokenizer(config.tokenizer).vocab_size)
        if problem:
            print(f"{os.path.basename(sys.argv[0])}: error: {problem}", file=sys.stderr)
            return 2
        print(describe_plan(config))
        return 0
    if config.checkpoint.exit_signal_handler:
        _SIGNAL.install()
    try:
        trainer = Trainer(config, observability=observability)
    except ArgumentError as e:
        print_rank_0(f"{os.path.basename(sys.argv[0])}: error: {e}")
        return 2
    except CheckpointError as e:
        print_rank_0(f"{os.path.basename(sys.argv[0])}: error: {e}")
        return 1
    try:
        trainer.train()
    except CheckpointError as e:  # a save failed (a full disk): every rank stops, saying what to do
        print_rank_0(f"{os.path.basename(sys.argv[0])}: error: {e}")
        return 1
    except TrainingDiverged as e:
        print_rank_0(f"{os.path.basename(sys.argv[0])}: error: {e}: stopping; nothing from this iteration is "
                     f"saved. Resume from the last checkpoint (--load) with a lower --lr, more --lr-warmup-iters "
                     f"or --clip-grad, or pass --no-check-for-nan-in-loss-and-grad to skip such steps")
        return 1
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
