"""Command-line arguments with Megatron-LM's flag names, plus FPDT's.

``parse_args`` parses; ``validate_args`` checks every combination once, before
any process group, model or data is built, and raises :class:`ArgumentError`
with a message that says what to change. Entry points turn that into a usage
error (exit code 2).

Where we differ from Megatron-LM: ``--fpdt`` and its ``--fpdt-*`` flags (and
DeepSpeed's ``--ds-sequence-parallel-*`` FPDT flags as aliases);
``--offload-recompute-inputs``; ``--offload-dir`` (a disk tier below host memory); ``--peak-tflops`` for MFU; no pipeline
parallelism in the training loop yet; ``--context-parallel-size`` is taken by
FPDT (the FPDT group occupies megatron-core's context-parallel axis).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from fpdt_ext.core.config import FPDTConfig, check_heads
from fpdt_ext.memory.disk import check_offload_dir
from megatron.training.tokenizer import add_tokenizer_args, check_tokenizer_args


class ArgumentError(ValueError):
    """A bad flag or combination of flags; the message says what to change."""


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x --hidden-size, as Megatron")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--kv-channels", type=int, default=None, help="default hidden/heads")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--use-rope-scaling", action="store_true")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--openai-gelu", action="store_true", help="GeLU with the tanh approximation (GPT-2's)")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size without a tokenizer (mock data)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)


def _add_parallel_args(p):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="split optimizer state over the data x FPDT ranks (megatron-core's distributed optimizer on "
                        "GPU; on the CPU a ZeRO-1 split of HostAdamW by whole parameters)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)
    g = p.add_argument_group("FPDT (DeepSpeed's --ds-sequence-parallel-* FPDT flags are accepted as aliases)")
    g.add_argument("--fpdt", "--ds-sequence-parallel-fpdt", dest="fpdt", action="store_true",
                   help="use FPDT attention, MLP and loss")
    g.add_argument("--fpdt-parallel-size", "--ds-sequence-parallel-size", dest="fpdt_parallel_size", type=int,
                   default=1, help="ranks in an FPDT sequence-parallel group")
    g.add_argument("--fpdt-chunk-size", "--ds-sequence-parallel-fpdt-chunk-size", dest="fpdt_chunk_size",
                   type=int, default=None, help="tokens per global chunk (default: the whole sequence)")
    g.add_argument("--fpdt-offload", "--ds-sequence-parallel-fpdt-offloading", dest="fpdt_offload",
                   action="store_true", help="keep chunks not being computed on in host memory")


def _add_training_args(p):
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro x data-parallel size")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="linear")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=["full"], default=None,
                   help="full: recompute each layer in backward (the FPDT paper's recipe)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--offload-recompute-inputs", action="store_true",
                   help="with full recompute: keep each layer's checkpointed input in host memory")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="a disk tier below host memory: what --fpdt-offload and --offload-recompute-inputs "
                        "offload goes to a file in DIR (a local disk or NVMe path) instead of host memory")


def _add_data_and_logging_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens (megatron-core's MockGPTDataset)")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX [PREFIX ...] or WEIGHT PREFIX [WEIGHT PREFIX ...] of .bin/.idx datasets")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart after each EOD")
    g.add_argument("--reset-attention-mask", action="store_true", help="not supported (see validate_args)")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    g.add_argument("--load", default=None, help="directory to resume from (newest usable checkpoint)")
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (e.g. SLURM preemption): finish the iteration, save, exit")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit after an iteration divisible "
                                                                   "by this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit after the first iteration that ends past this many minutes")
    g.add_argument("--dry-run", action="store_true",
                   help="validate the whole configuration (layout, divisibility, tokenizer files), print the "
                        "plan, and exit without starting processes")
    g.add_argument("--dry-run-world-size", type=int, default=None,
                   help="with --dry-run: the number of processes the real run will have")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: known GPUs; none on CPU)")
    g.add_argument("--loss-log-file", default=None, help="also write one JSON line per logged iteration here")


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for add in (_add_model_args, _add_parallel_args, _add_training_args, _add_data_and_logging_args,
                add_tokenizer_args):
        add(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None,
               description: Optional[str] = None) -> argparse.Namespace:
    """Parse flags; ``defaults`` (e.g. Llama's) apply where a flag is not given."""
    parser = build_parser(description)
    if defaults:
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def cuda_available() -> bool:
    from fpdt_ext import runtime

    return runtime.current().cuda


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check every combination; fill derived values. Raises ArgumentError."""
    if world_size is None:
        world_size = args.dry_run_world_size if args.dry_run and args.dry_run_world_size else _world_size()
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    fpdt_size = args.fpdt_parallel_size
    if args.context_parallel_size != 1:
        raise ArgumentError("--context-parallel-size is not supported: FPDT occupies megatron-core's context-"
                            "parallel axis; use --fpdt --fpdt-parallel-size N instead")
    if pp != 1:
        raise ArgumentError("--pipeline-model-parallel-size > 1 is not supported by this training loop yet; "
                            "use tensor parallelism and FPDT instead")
    if fpdt_size > 1 and not args.fpdt:
        raise ArgumentError(f"--fpdt-parallel-size {fpdt_size} needs --fpdt")
    for name in ("fpdt_chunk_size", "fpdt_offload"):
        if getattr(args, name) and not args.fpdt:
            raise ArgumentError(f"--{name.replace('_', '-')} needs --fpdt")
    model_parallel = tp * fpdt_size * pp
    if world_size % model_parallel:
        raise ArgumentError(
            f"world size {world_size} is not divisible by tensor ({tp}) x FPDT ({fpdt_size}) x pipeline ({pp}) "
            f"parallel sizes = {model_parallel}; launch a multiple of {model_parallel} processes")
    args.world_size = world_size
    args.data_parallel_size = world_size // model_parallel

    if args.bf16 and args.fp16:
        raise ArgumentError("choose one of --bf16 and --fp16")
    if args.fp16 and not cuda_available():
        raise ArgumentError("--fp16 needs a GPU (loss scaling lives in megatron-core's GPU optimizer); use "
                            "--bf16 or float32 on the CPU")
    args.params_dtype = "bfloat16" if args.bf16 else ("float16" if args.fp16 else "float32")
    if args.kv_channels is None:
        if args.hidden_size % args.num_attention_heads:
            raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                                f"{args.num_attention_heads}; set --kv-channels")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    args.num_query_groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        raise ArgumentError(f"--max-position-embeddings {args.max_position_embeddings} is shorter than "
                            f"--seq-length {args.seq_length}")
    try:
        check_heads(args.num_attention_heads, args.num_query_groups, sp_size=fpdt_size if args.fpdt else 1,
                    tp_size=tp)
    except ValueError as e:
        raise ArgumentError(str(e)) from None

    if args.fpdt:
        if args.attention_dropout:
            raise ArgumentError(f"FPDT attention has no dropout: add --attention-dropout 0 "
                                f"(got {args.attention_dropout})")
        if args.sequence_parallel:
            raise ArgumentError("--sequence-parallel (Megatron-SP) cannot be combined with --fpdt yet; drop it "
                                "(FPDT already splits the sequence)")
        try:
            args.fpdt_config = FPDTConfig(fpdt_parallel_size=fpdt_size, fpdt_chunk_size=args.fpdt_chunk_size,
                                          fpdt_offload=args.fpdt_offload,
                                          offload_dir=args.offload_dir if args.fpdt_offload else None)
            args.fpdt_num_chunks = args.fpdt_config.num_chunks(args.seq_length)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
    else:
        args.fpdt_config = None
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron: meaningless without TP

    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}; use a multiple of {args.micro_batch_size * dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)

    if args.offload_recompute_inputs and args.recompute_granularity != "full":
        raise ArgumentError("--offload-recompute-inputs needs --recompute-granularity full")
    if args.offload_dir is not None:
        if not (args.fpdt_offload or args.offload_recompute_inputs):
            raise ArgumentError("--offload-dir has nothing to hold: add --fpdt-offload (attention chunks) and/or "
                                "--offload-recompute-inputs (checkpointed layer inputs)")
        try:
            check_offload_dir(args.offload_dir)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.lr_warmup_iters and args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be shorter than the decay "
                            f"({args.lr_decay_iters} iterations: --lr-decay-iters, default --train-iters)")
    if not args.mock_data and not args.data_path:
        raise ArgumentError("give --data-path PREFIX [PREFIX ...] or --mock-data")
    if args.tokenizer_type is None:
        if not args.mock_data:
            raise ArgumentError("--data-path needs the tokenizer it was made with: set --tokenizer-type (and its "
                                "files)")
        if args.vocab_size is None:
            raise ArgumentError("--mock-data without a tokenizer needs --vocab-size")
        args.tokenizer_type = "NullTokenizer"
    problem = check_tokenizer_args(args)
    if problem:
        raise ArgumentError(problem)
    if args.reset_attention_mask:
        raise ArgumentError("--reset-attention-mask is not supported: FPDT and the baseline attend causally over "
                            "the whole sequence (no per-document masks); drop it (--reset-position-ids and "
                            "--eod-mask-loss do work)")
    if args.reset_position_ids and args.position_embedding_type == "rope":
        raise ArgumentError("--reset-position-ids with --position-embedding-type rope is not supported: "
                            "megatron-core's GPTModel (the baseline) applies RoPE at 0..S-1 whatever the position "
                            "ids; use it with learned_absolute positions")
    if args.data_path and not args.mock_data:
        prefixes = [p for i, p in enumerate(args.data_path) if not (len(args.data_path) % 2 == 0 and i % 2 == 0)]
        for prefix in prefixes:
            missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise ArgumentError(f"--data-path {prefix}: {' and '.join(prefix + e for e in missing)} not found "
                                    f"(make it with tools/preprocess_data.py)")
    if args.save_interval is not None and not args.save:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.keep_last is not None and args.keep_last < 1:
        raise ArgumentError("--keep-last must be at least 1")
    for name in ("save_interval", "exit_interval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive")
    for name in ("log_interval", "eval_interval", "train_iters", "micro_batch_size", "seq_length"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive")
    if args.eval_iters < 0:
        raise ArgumentError("--eval-iters must be >= 0")
    return args


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's vocabulary padding: a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple
