"""What the evaluation tools share (tools/eval_ppl.py, tools/eval_passkey.py): the flags that name a
checkpoint and its parallel layout, their checks, the tokenizer, and the model built for scoring.

Every mistake is a :class:`UsageError`: one line on stderr, printed by rank 0 only, exit code 2,
before the model is built (and before the checkpoint is read, but for what needs its vocabulary
or tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from megatron.training.tokenizer import TOKENIZER_TYPES, load_tokenizer


class UsageError(Exception):
    """A mistake in the flags or the input: one line saying what to change (exit code 2)."""


def rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # as argparse's, printed once however many processes torchrun starts
        if rank0():
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def add_model_flags(p: argparse.ArgumentParser, pipeline: bool = False) -> None:
    """--load, the TP x FPDT (x PP with ``pipeline``) layout to score with, and the tokenizer flags
    (default: the run's)."""
    p.add_argument("--load", required=True, help="checkpoint directory (newest usable checkpoint is used)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    if pipeline:
        p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                       help="pipeline stages (any size whose stages split the layers evenly: checkpoints load at "
                            "any pipeline size)")
    p.add_argument("--fpdt", action="store_true")
    p.add_argument("--fpdt-parallel-size", type=int, default=1)
    p.add_argument("--fpdt-chunk-size", type=int, default=None)
    p.add_argument("--fpdt-offload", action="store_true")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_model_flags(opts, script: str) -> None:
    """Mistakes in the layout flags and the paths they name, before anything is loaded."""
    for name in ("fpdt_chunk_size", "tensor_model_parallel_size", "fpdt_parallel_size", "pipeline_model_parallel_size"):
        value = getattr(opts, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be positive")
    if not opts.fpdt and (opts.fpdt_parallel_size != 1 or opts.fpdt_chunk_size or opts.fpdt_offload):
        raise UsageError("--fpdt-parallel-size, --fpdt-chunk-size and --fpdt-offload need --fpdt")
    if opts.fpdt_chunk_size and opts.fpdt_chunk_size % opts.fpdt_parallel_size:
        raise UsageError(f"--fpdt-chunk-size {opts.fpdt_chunk_size} is not a multiple of --fpdt-parallel-size "
                         f"{opts.fpdt_parallel_size} (each chunk is split over the FPDT ranks)")
    pp = pipeline_size(opts)
    ranks = opts.tensor_model_parallel_size * opts.fpdt_parallel_size * pp
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != ranks:
        layout = "TP x FPDT" + (" x PP" if hasattr(opts, "pipeline_model_parallel_size") else "")
        raise UsageError(f"{script} runs one sequence at a time on {layout} = {ranks} processes; launch {ranks}, "
                         f"not {world}")
    if not os.path.isdir(opts.load):
        raise UsageError(f"--load {opts.load} " + ("is a file; give the checkpoint directory"
                                                   if os.path.exists(opts.load) else "does not exist"))
    for flag in ("tokenizer_model", "vocab_file", "merge_file"):
        path = getattr(opts, flag)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path} does not exist")


def pipeline_size(opts) -> int:
    return getattr(opts, "pipeline_model_parallel_size", 1)


def check_output(flag: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path} cannot be written" + ("" if os.path.isdir(folder) else
                                                               f" ({folder} does not exist)"))


@dataclasses.dataclass
class Checkpoint:
    path: str
    common: dict
    model_args: dict
    vocab: int


def open_checkpoint(opts) -> Checkpoint:
    """The newest usable checkpoint under --load and its model arguments (starts torch.distributed)."""
    from megatron.core import dist_checkpointing

    from fpdt_ext.runtime import init_distributed
    from megatron.training.checkpointing import newest_usable_checkpoint

    init_distributed()
    path, reasons = newest_usable_checkpoint(opts.load)
    if path is None:
        raise UsageError(f"--load {opts.load}: no usable checkpoint (" + ("; ".join(reasons) or "no iter_* "
                         "directory") + "); point --load at a training run's --save directory")
    common = dist_checkpointing.load_common_state_dict(path)
    if "model_args" not in common:
        raise UsageError(f"--load {opts.load}: {path} holds no model arguments (not written by this project's "
                         f"training); convert it with tools/checkpoint/convert.py")
    model_args = common["model_args"]
    return Checkpoint(path, common, model_args, common.get("true_vocab_size") or model_args["vocab_size"])


def text_tokenizer(opts, ckpt: Checkpoint):
    """The tokenizer the flags name, else the run's; None when neither names one."""
    from megatron.training.config import TokenizerConfig

    names = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
    config = TokenizerConfig(**{k: getattr(opts, k) or ckpt.model_args.get(k) for k in names}, vocab_size=ckpt.vocab)
    if config.tokenizer_type is None:
        return None
    try:
        return load_tokenizer(config)
    except ValueError as e:
        raise UsageError(str(e)) from None


def sequence_multiple(opts) -> int:
    """What every scored sequence's length is padded to a multiple of."""
    return opts.fpdt_chunk_size or (opts.fpdt_parallel_size if opts.fpdt else 1)


def build_eval_model(opts, ckpt: Checkpoint, longest: int):
    """The checkpoint's model, in eval mode, for sequences of up to ``longest`` tokens (a multiple
    of :func:`sequence_multiple`) on the TP x FPDT (x PP) layout of the flags: (model, groups);
    under a pipeline, this rank's stage (run it with :func:`stage_output`)."""
    from megatron.core import dist_checkpointing

    from fpdt_ext.core.config import FPDTConfig
    from megatron.training.checkpointing import CheckpointError, model_config_from_args, model_for_checkpoint
    from megatron.training.config import DataConfig, ParallelConfig, RunConfig, TokenizerConfig, TrainingConfig
    from megatron.training.initialize import initialize
    from megatron.training.models import build_model_chunks

    sp = opts.fpdt_parallel_size if opts.fpdt else 1
    model = model_config_from_args(ckpt.model_args)
    positions = model.max_position_embeddings
    if model.rotary:
        positions = max(longest, positions)
    elif longest > positions:
        raise UsageError(f"a sequence of {longest} tokens is longer than the model's {positions} learned "
                         f"positions; score shorter ones")
    model = dataclasses.replace(model, attention_dropout=0.0, hidden_dropout=0.0, max_position_embeddings=positions)
    try:
        fpdt = FPDTConfig(fpdt_parallel_size=sp, fpdt_chunk_size=opts.fpdt_chunk_size,
                          fpdt_offload=opts.fpdt_offload) if opts.fpdt else None
        config = RunConfig(model=model, training=TrainingConfig(seq_length=longest, train_iters=1),
                           data=DataConfig(mock_data=True),
                           parallel=ParallelConfig(world_size=dist.get_world_size(),
                                                   tensor_model_parallel_size=opts.tensor_model_parallel_size,
                                                   fpdt_parallel_size=sp,
                                                   pipeline_model_parallel_size=pipeline_size(opts)),
                           tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=ckpt.vocab),
                           fpdt=fpdt)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:  # the checkpoint's own padded vocabulary: exact at any TP size that divides it
        padded = model_for_checkpoint(ckpt.common, ckpt.path, config.model, ckpt.vocab, opts.tensor_model_parallel_size)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    groups = initialize(config)
    built, = build_model_chunks(config, groups, ckpt.vocab, padded_vocab=padded)
    built.load_state_dict(dist_checkpointing.load({"model": built.sharded_state_dict()}, ckpt.path)["model"])
    built.eval()
    return built, groups


def local_batch(opts, groups, inputs, labels, length: int) -> dict:
    """One sequence (``inputs``/``labels``: lists of ids, padded with 0 to ``length``) as this rank
    holds it: the FPDT layout's share with --fpdt, else all of it."""
    from fpdt_ext.core.layout import fpdt_shard_batch

    pad = length - len(inputs)
    batch = {"tokens": torch.tensor(inputs + [0] * pad).view(1, length),
             "labels": torch.tensor(labels + [0] * pad).view(1, length),
             "position_ids": torch.arange(length).view(1, length)}
    if opts.fpdt:
        batch = fpdt_shard_batch(batch, sp_rank=groups.sp_rank, sp_size=opts.fpdt_parallel_size,
                                 num_chunks=local_chunks(opts, length))
    return batch


def stage_output(model, groups, opts, batch: dict, length: int) -> torch.Tensor:
    """The model's per-token loss on ``batch`` (this rank's piece, with labels): ``[1, length/P]``;
    under a pipeline, run through the stages and returned on each."""
    device = next(model.parameters()).device

    def forward(chunk):
        return chunk(*(batch[k].to(device) for k in ("tokens", "position_ids")), None,
                     labels=batch["labels"].to(device))

    if pipeline_size(opts) == 1:
        with torch.no_grad():
            return forward(model)
    from megatron.training.pipeline import forward_through_stages

    return forward_through_stages(model, forward, seq_length=length, micro_batch_size=1, groups=groups)


def local_chunks(opts, length: int) -> int:
    return length // opts.fpdt_chunk_size if opts.fpdt and opts.fpdt_chunk_size else 1


def run_tool(script: str, work) -> int:
    """``work()``'s exit code; a :class:`UsageError` it raises is one line from rank 0 and exit code 2."""
    try:
        return work()
    except UsageError as e:
        if rank0():
            print(f"{script}: error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
