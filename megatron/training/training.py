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
from fpdt_ext.memory.disk import disk_peak_bytes
from fpdt_ext.memory.saved import SavedTensorsToHost
from megatron.training.arguments import ArgumentError, parse_args, validate_args
from megatron.training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from megatron.training.data import MicroBatches, build_datasets, to_model_layout
from megatron.training.flops import device_peak_tflops, flops_per_token_from_args
from megatron.training.initialize import initialize
from megatron.training.models import build_model, transformer_config
from megatron.training.optimizer import build_optimizer
from megatron.training.tokenizer import build_tokenizer


class _Signal:
    """SIGTERM sets a flag; the loop saves and exits after the current iteration."""

    received = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.received = True
        signal.signal(signal.SIGTERM, handler)


_SIGNAL = _Signal


@dataclasses.dataclass
class RunState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def print_rank_0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


class Trainer:
    def __init__(self, args):
        self.args = args
        self.groups = initialize(args)
        self.runtime = runtime.current()
        self.device = self.runtime.device
        self.tokenizer = build_tokenizer(args)
        model = build_model(args, self.groups, self.tokenizer.vocab_size)
        # On the CPU HostAdamW splits its own state (ZeRO-1); on GPU megatron-core's distributed
        # optimizer needs DDP's buffers laid out for it.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=args.use_distributed_optimizer and self.runtime.cuda)
        self.model = DistributedDataParallel(transformer_config(args), ddp_config, model,
                                             pg_collection=self.groups.pg_collection)
        self.optimizer, self.scheduler = build_optimizer(args, self.model, self.groups)
        train_ds, valid_ds, _ = build_datasets(args, self.tokenizer)
        self.state = RunState()
        batches = dict(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                       dp_rank=self.groups.dp_rank, dp_size=self.groups.layout.data_parallel_size)
        self.train_data = MicroBatches(train_ds, **batches)
        self.valid_data = MicroBatches(valid_ds, **batches)
        self.num_chunks = args.fpdt_num_chunks if args.fpdt else None
        if args.load:
            load_checkpoint(self, args.load)
        self.flops_per_token = flops_per_token_from_args(args, self.tokenizer.vocab_size)
        self.peak_tflops = device_peak_tflops(args.peak_tflops)
        self.num_parameters = sum(p.numel() for p in model.parameters())

    # -- one micro batch ----------------------------------------------------------
    def _loss_terms(self, batch):
        """(masked loss sum on this rank, masked token count of the whole sequence)."""
        b = to_model_layout(batch, groups=self.groups, num_chunks=self.num_chunks, device=self.device)
        offload = (SavedTensorsToHost(directory=self.args.offload_dir) if self.args.offload_recompute_inputs
                   else contextlib.nullcontext())
        with offload:
            losses = self.model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [b, s/P]
        mask = b["loss_mask"].float()
        tokens = mask.sum()
        if self.groups.layout.fpdt_parallel_size > 1:
            dist.all_reduce(tokens, group=self.groups.sp)
        return (losses.float() * mask).sum(), tokens

    def train_step(self):
        args = self.args
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        sp_size = self.groups.layout.fpdt_parallel_size
        # summed on the device: no host synchronisation per micro batch
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        token_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        # megatron-core's mixed-precision optimizers unscale the gradients by their loss scale.
        loss_scale = self.optimizer.get_loss_scale() if hasattr(self.optimizer, "get_loss_scale") else 1.0
        for batch in self.train_data.global_batch():
            local_sum, tokens = self._loss_terms(batch)
            (local_sum * sp_size / tokens.clamp(min=1) / args.num_microbatches * loss_scale).backward()
            loss_sum += local_sum.detach().double()
            token_sum += tokens.detach().double() / sp_size
        # megatron-core's gradient finalisation: the DDP reduction over data x FPDT ranks, plus
        # the sums over TP of replicated parameters that see only this rank's heads (q/k layernorm)
        finalize_model_grads([self.model], pg_collection=self.groups.pg_collection)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        else:
            self.state.skipped_iterations += 1
        totals = torch.stack([loss_sum, token_sum])
        dist.all_reduce(totals, group=self.groups.dp_sp)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        if not math.isfinite(loss):
            self.state.nan_iterations += 1
        self.state.iteration += 1
        self.state.consumed_samples += args.global_batch_size
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self):
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(self.args.eval_iters):
            for batch in self.valid_data.global_batch():
                local_sum, tokens = self._loss_terms(batch)
                totals += torch.stack([local_sum.double(), tokens.double() / self.groups.layout.fpdt_parallel_size])
        self.model.train()
        dist.all_reduce(totals, group=self.groups.dp_sp)
        return (totals[0] / totals[1].clamp(min=1)).item()

    # -- the loop ------------------------------------------------------------------
    def train(self):
        args = self.args
        print_rank_0(f"> {self.num_parameters * args.tensor_model_parallel_size / 1e6:.2f}M parameters "
                     f"(TP shards counted once per rank x TP), world {args.world_size} = TP "
                     f"{args.tensor_model_parallel_size} x FPDT {args.fpdt_parallel_size} x DP "
                     f"{args.data_parallel_size}; {'FPDT ' + str(self.num_chunks) + ' chunks' if args.fpdt else 'baseline'}"
                     f"{', offload' if args.fpdt_offload else ''}{' to ' + args.offload_dir if args.offload_dir else ''}; seq {args.seq_length}, global batch "
                     f"{args.global_batch_size} ({args.num_microbatches} micro batches)")
        log_file = open(args.loss_log_file, "a") if args.loss_log_file and dist.get_rank() == 0 else None
        tokens_per_iter = args.global_batch_size * args.seq_length
        run_start = interval_start = time.perf_counter()
        interval_iters = 0
        losses, last = [], {}
        while self.state.iteration < args.train_iters:
            loss, grad_norm = self.train_step()
            losses.append(loss)
            interval_iters += 1
            it = self.state.iteration
            if it % args.log_interval == 0 or it == args.train_iters:
                elapsed = (time.perf_counter() - interval_start) / interval_iters
                tflops = self.flops_per_token * tokens_per_iter / elapsed / args.world_size / 1e12
                last = dict(iteration=it, lm_loss=loss, grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                            ms_per_iter=elapsed * 1e3, tokens_per_s=tokens_per_iter / elapsed,
                            tflops_per_device=tflops, mfu=tflops / self.peak_tflops if self.peak_tflops else None,
                            peak_mem_gib=self.runtime.peak_memory_bytes() / 2**30)
                if args.offload_dir:
                    last["peak_disk_gib"] = disk_peak_bytes() / 2**30
                self._log(last)
                interval_start, interval_iters = time.perf_counter(), 0
            exit_reason = self._exit_reason(it, run_start)
            due = (args.save_interval and it % args.save_interval == 0) or it == args.train_iters
            if args.save and (due or exit_reason):
                last["checkpoint"] = save_checkpoint(self, it)
                print_rank_0(f" saved checkpoint at iteration {it} to {last['checkpoint']}")
                interval_start = time.perf_counter()
            if args.eval_iters and (it % args.eval_interval == 0 or it == args.train_iters):
                val = self.evaluate()
                print_rank_0(f" validation loss at iteration {it} | lm loss value: {val:.6E} | "
                             f"lm loss PPL: {math.exp(min(val, 20)):.6E} |")
                last["val_loss"] = val
                interval_start = time.perf_counter()
            if log_file and last.get("iteration") == it:
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
            if exit_reason:
                print_rank_0(f" exiting at iteration {it}: {exit_reason}")
                break
        if log_file:
            log_file.close()
        run_seconds = time.perf_counter() - run_start
        if not losses:
            print_rank_0(f"summary: nothing to train (at iteration {self.state.iteration} of {args.train_iters})")
            return dict(last, losses=[])
        summary = dict(last, losses=losses, first_loss=losses[0], final_loss=losses[-1],
                       mean_tokens_per_s=tokens_per_iter * len(losses) / run_seconds)
        print_rank_0(f"summary: {len(losses)} iterations in {run_seconds:.0f}s | lm loss {losses[0]:.3f} -> "
                     f"{losses[-1]:.3f} | {summary['mean_tokens_per_s']:.0f} tokens/s overall"
                     + (f" | validation loss {last['val_loss']:.3f}" if "val_loss" in last else "")
                     + (f" | checkpoint: {last['checkpoint']}" if "checkpoint" in last else ""))
        return summary

    def _exit_reason(self, iteration: int, run_start: float) -> Optional[str]:
        """Why to stop after this iteration (all ranks agree), or None."""
        args = self.args
        local = 0
        if args.exit_signal_handler and _SIGNAL.received:
            local = 1
        if args.exit_duration_in_mins and (time.perf_counter() - run_start) / 60 > args.exit_duration_in_mins:
            local = max(local, 2)
        if args.exit_signal_handler or args.exit_duration_in_mins:
            flag = torch.tensor([local], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        if local == 1:
            return "SIGTERM received"
        if local == 2:
            return f"--exit-duration-in-mins {args.exit_duration_in_mins} reached"
        if args.exit_interval and iteration % args.exit_interval == 0 and iteration < args.train_iters:
            return f"--exit-interval {args.exit_interval}"
        return None

    def _log(self, m):
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
        # megatron-core's optimizers give no norm for a step skipped on overflow (fp16)
        grad_norm = f"{m['grad_norm']:.3f}" if m["grad_norm"] is not None else "n/a"
        print_rank_0(
            f" iteration {m['iteration']:8d}/{self.args.train_iters:8d} | consumed samples: "
            f"{self.state.consumed_samples:12d} | elapsed time per iteration (ms): {m['ms_per_iter']:.1f} | "
            f"learning rate: {m['lr']:.6E} | global batch size: {self.args.global_batch_size:5d} | "
            f"lm loss: {m['lm_loss']:.6E} | grad norm: {grad_norm} | number of skipped iterations: "
            f"{self.state.skipped_iterations:3d} | number of nan iterations: {self.state.nan_iterations:3d} | "
            f"tokens/s: {m['tokens_per_s']:.0f} | TFLOP/s/device: {m['tflops_per_device']:.3f} | MFU: {mfu} | "
            f"peak mem (GiB): {m['peak_mem_gib']:.2f} |"
            + (f" peak offload file (GiB): {m['peak_disk_gib']:.2f} |" if "peak_disk_gib" in m else ""))


def describe_plan(args) -> str:
    """What a validated configuration will run, for --dry-run."""
    from megatron.training.arguments import padded_vocab_size
    from megatron.training.flops import count_parameters
    from megatron.training.tokenizer import build_tokenizer, tokenizer_files

    vocab = build_tokenizer(args).vocab_size
    padded = padded_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    sp = args.fpdt_parallel_size
    lines = [
        "dry run: the configuration is valid",
        f"  world {args.world_size} = TP {args.tensor_model_parallel_size} x FPDT {sp} x PP "
        f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size}",
        f"  model: {count_parameters(args, padded) / 1e9:.2f}B parameters (L={args.num_layers}, h={args.hidden_size}, "
        f"heads {args.num_attention_heads}/kv {args.num_query_groups}, ffn {args.ffn_hidden_size}, vocab {vocab} "
        f"padded to {padded})",
        f"  batch: {args.global_batch_size} sequences of {args.seq_length} tokens = {args.num_microbatches} micro "
        f"batches of {args.micro_batch_size} per data-parallel rank",
    ]
    if args.fpdt:
        u = args.fpdt_num_chunks
        lines.append(f"  FPDT: {args.seq_length // sp} tokens per rank in {u} chunks of {args.seq_length // u} "
                     f"tokens ({args.seq_length // u // sp} per rank); offload {'on' if args.fpdt_offload else 'off'}")
    else:
        lines.append("  baseline: megatron-core GPTModel, standard spec")
    files = tokenizer_files(args)
    lines.append(f"  tokenizer: {args.tokenizer_type}" + (f" ({', '.join(files)}: found)" if files else ""))
    lines.append("  data: " + ("mock" if args.mock_data else " ".join(args.data_path)))
    return "\n".join(lines)


def pretrain(argv=None, defaults: Optional[dict] = None, description: Optional[str] = None) -> int:
    """Entry point of pretrain_*.py: parse, validate, train. Returns the exit code."""
    args = parse_args(argv, defaults=defaults, description=description)
    try:
        validate_args(args)
    except ArgumentError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe_plan(args))
        return 0
    if args.exit_signal_handler:
        _SIGNAL.install()
    try:
        trainer = Trainer(args)
    except CheckpointError as e:
        print_rank_0(f"{os.path.basename(sys.argv[0])}: error: {e}")
        return 1
    trainer.train()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
