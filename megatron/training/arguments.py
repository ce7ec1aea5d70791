"""Command-line arguments with Megatron-LM's flag names, plus FPDT's.

``parse_args`` parses; ``validate_args`` turns the flags into the frozen
:class:`~megatron.training.config.RunConfig` (whose parts check every combination)
before any process group, model or data is built, and raises :class:`ArgumentError`
with a message that says what to change. Entry points turn that into a usage
error (exit code 2). Nothing downstream reads the flags: tools and benchmarks build
a RunConfig directly.

Where we differ from Megatron-LM: ``--fpdt`` and its ``--fpdt-*`` flags (and
DeepSpeed's ``--ds-sequence-parallel-*`` FPDT flags as aliases);
``--offload-recompute-inputs``; ``--offload-dir`` (a disk tier below host memory); ``--peak-tflops`` for MFU; no pipeline
parallelism in the training loop yet; ``--context-parallel-size`` is taken by
FPDT (the FPDT group occupies megatron-core's context-parallel axis); ``--finetune``
resumes from ``--save`` once that holds the stage's own checkpoints, and
``--no-load-rng`` re-seeds from ``--seed`` and the iteration (docs/STAGES.md).
With a constant global batch the LR schedule steps once per iteration: Megatron-LM's
sample-based lengths (``--train-samples``, ``--lr-warmup-samples``, ``--lr-decay-samples``)
and DeepSpeed's token counts become (fractional) iterations of the global batch, the same
schedule. With a batch ramp-up (``--rampup-batch-size``, ``--step-batch-size-schedule``) it
counts samples, as Megatron-LM's. ``--recompute-granularity selective`` is the baseline's
only (FPDT layers refuse it).

Megatron-LM's and Megatron-DeepSpeed's other launch-script flags, and DeepSpeed's
JSON config, are in one table in :mod:`megatron.training.compat`: honoured (translated
onto ours), noted (accepted, a one-line note at start says why it changes nothing),
or refused with what to use (docs/MIGRATING.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

from fpdt_ext import runtime
from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.memory.disk import check_offload_dir
from megatron.training import compat
from megatron.training.compat import add_compat_args
from megatron.training.config import (SHARDING_STRATEGIES, CheckpointConfig, DataConfig, ModelConfig, ParallelConfig,
                                      RunConfig, TokenizerConfig, TrainingConfig)
from megatron.training.data import check_dataset_files, resolve_split
from megatron.training.observability import add_observability_args
from megatron.training.tokenizer import add_tokenizer_args, check_tokenizer_args, load_tokenizer


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
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "yarn"],
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                   help="linear position interpolation: RoPE at position / factor (Hugging Face rope_type linear)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.1's RoPE frequency scaling (Hugging Face rope_type llama3), with the next four flags")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--rope-scaling-low-freq-factor", type=float, default=1.0)
    g.add_argument("--rope-scaling-high-freq-factor", type=float, default=4.0)
    g.add_argument("--rope-scaling-original-max-position-embeddings", type=int, default=8192,
                   help="the context the model was pretrained at, before --use-rope-scaling")
    g.add_argument("--rotary-scaling-factor", type=float, default=1.0,
                   help="YaRN's context-extension factor (--position-embedding-type yarn; Hugging Face rope_type yarn)")
    g.add_argument("--yarn-original-max-position-embeddings", type=int, default=4096,
                   help="the context the model was pretrained at, before YaRN")
    g.add_argument("--yarn-beta-fast", type=float, default=32.0,
                   help="YaRN: frequencies with more rotations than this over the original context are kept")
    g.add_argument("--yarn-beta-slow", type=float, default=1.0,
                   help="YaRN: frequencies with fewer rotations than this are divided by the factor")
    g.add_argument("--mscale", type=float, default=1.0,
                   help="YaRN's attention factor (cos and sin scaled): (0.1 mscale ln(factor) + 1) / "
                        "(0.1 mscale-all-dim ln(factor) + 1)")
    g.add_argument("--mscale-all-dim", type=float, default=0.0)
    g.add_argument("--yarn-correction-range-round-to-int", action="store_true", default=True,
                   help="YaRN: round the ends of the blended frequency range to integers (Hugging Face truncate; "
                        "the default)")
    g.add_argument("--no-yarn-correction-range-round-to-int", dest="yarn_correction_range_round_to_int",
                   action="store_false")
    g.add_argument("--normalization", type=_normalization, choices=["LayerNorm", "RMSNorm"], default="LayerNorm",
                   help="LayerNorm or RMSNorm (any case, as DeepSpeed's scripts write it)")
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="zero-centred norm weights: every norm stores w (initialised to 0) and scales by 1 + w "
                        "(Megatron-LM's; Hugging Face export adds 1 to the norm weights)")
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
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (megatron-core's 1F1B schedule; interleaved with virtual stages)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Megatron-LM's: layers per virtual stage (the interleaved schedule)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="Megatron-LM's: model chunks per pipeline rank (the interleaved schedule)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers on the first pipeline stage (the others share the rest evenly)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers on the last pipeline stage")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="split optimizer state over the data x FPDT ranks (megatron-core's distributed optimizer on "
                        "GPU; on the CPU a ZeRO-1 split of HostAdamW by whole parameters)")
    g.add_argument("--use-torch-fsdp2", action="store_true",
                   help="shard parameters, gradients and optimizer state over the data x FPDT ranks (torch FSDP2, "
                        "ZeRO-3)")
    g.add_argument("--use-megatron-fsdp", action="store_true",
                   help="megatron-core's Megatron-FSDP over the data x FPDT ranks, sharding what "
                        "--data-parallel-sharding-strategy says (GPU; on the CPU the same sharding by the "
                        "distributed optimizer or FSDP2; untested on GPU)")
    g.add_argument("--data-parallel-sharding-strategy", default="no_shard",
                   choices=SHARDING_STRATEGIES,
                   help="with --use-megatron-fsdp: optim (ZeRO-1), optim_grads (ZeRO-2) or optim_grads_params "
                        "(ZeRO-3)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="GPU: reduce gradient buckets during the last micro batch's backward (megatron-core's DDP); "
                        "the CPU reduces after it")
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
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro x data-parallel size (with "
                   "a ramp-up: the final batch)")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="ramp the global batch up from START by INCREMENT to --global-batch-size over SAMPLES "
                        "samples (megatron-core's ramp-up)")
    g.add_argument("--step-batch-size-schedule", default=None, metavar='"THRESHOLD:BATCH ..."',
                   help="the global batch from each THRESHOLD tokens consumed on (K/M/B/T suffixes; Megatron-LM's)")
    g.add_argument("--train-iters", type=int, default=None, help="the run's length (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="the run's length in sequences: --train-samples // global batch iterations (Megatron-LM's "
                        "sample-based training; its LR lengths are then in samples too)")
    g.add_argument("--train-tokens", type=int, default=None,
                   help="also stop at the first iteration that reaches this many tokens (DeepSpeed's)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="the peak LR of the input embedding and output layer weights (default --lr)")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="with --decoupled-lr: their final LR (default --min-lr)")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of the decay")
    g.add_argument("--lr-warmup-tokens", type=int, default=None, help="DeepSpeed's: tokens = samples x seq length")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="default --train-samples")
    g.add_argument("--lr-decay-tokens", type=int, default=None, help="DeepSpeed's: tokens = samples x seq length")
    g.add_argument("--override-opt_param-scheduler", dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, the LR schedule of these flags (its position from the checkpoint), not the "
                        "checkpoint's, as Megatron-LM")
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
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_true",
                   default=True, help="stop at a NaN or infinite loss or gradient norm, naming the iteration "
                                      "(on by default, as Megatron-LM)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="skip such steps and go on instead")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: recompute each layer in backward (the FPDT paper's recipe); selective: "
                        "megatron-core's core-attention recompute (baseline only)")
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
    g.add_argument("--finetune", action="store_true",
                   help="start a new stage from --load's model weights only: iteration 0, a fresh optimizer, LR "
                        "schedule, data position and RNG (once --save holds this stage's own checkpoints, a "
                        "restart resumes from them instead)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load the optimizer state or the LR schedule (both start afresh); the iteration, "
                        "data position and RNG continue")
    g.add_argument("--no-load-rng", action="store_true",
                   help="do not restore the RNG states: re-seed from --seed and the iteration")
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
                add_tokenizer_args, add_compat_args, add_observability_args):
        add(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None,
               description: Optional[str] = None) -> argparse.Namespace:
    """Parse flags; ``defaults`` (e.g. Llama's) apply where a flag is not given.
    ``command_line_flags`` holds the dests given on the command line (what a DeepSpeed JSON or a
    foreign alias may not silently override)."""
    parser = build_parser(description)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.command_line_flags = command_line_flags(argv)
    return args


def command_line_flags(argv: Optional[Sequence[str]] = None) -> frozenset:
    """The dests of the flags ``argv`` (default: this process's) gives explicitly."""
    parser = build_parser()
    for action in parser._actions:  # every default suppressed: only what argv sets appears
        action.default, action.required = argparse.SUPPRESS, False
    return frozenset(vars(parser.parse_known_args(argv)[0]))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _fields(cls, args) -> dict:
    """The flags of ``args`` that are fields of the dataclass ``cls`` (same names)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _virtual_stages(args) -> Optional[int]:
    """Model chunks per pipeline rank from Megatron-LM's two spellings (None: not interleaved)."""
    per_stage, per_rank = args.num_layers_per_virtual_pipeline_stage, args.num_virtual_stages_per_pipeline_rank
    if per_stage is not None and per_rank is not None:
        raise ValueError("give one of --num-layers-per-virtual-pipeline-stage and "
                         "--num-virtual-stages-per-pipeline-rank (Megatron-LM takes one)")
    if per_rank is not None:
        return per_rank
    if per_stage is None:
        return None
    pp = args.pipeline_model_parallel_size
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    if first is not None or last is not None:
        raise ValueError("with --decoder-first/last-pipeline-num-layers give the virtual stages as "
                         "--num-virtual-stages-per-pipeline-rank")
    if per_stage < 1 or args.num_layers % (pp * per_stage):
        raise ValueError(f"--num-layers {args.num_layers} is not a multiple of --pipeline-model-parallel-size {pp} "
                         f"x --num-layers-per-virtual-pipeline-stage {per_stage}")
    return args.num_layers // pp // per_stage


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> RunConfig:
    """The run configuration the flags describe, every combination checked (the parts check
    themselves; here: what only flags can get wrong, and the files they name). ``args`` is not
    changed. Raises ArgumentError, with what to change."""
    try:  # Megatron-LM's and DeepSpeed's flags (and DeepSpeed's JSON) onto ours; refused ones stop here
        given = getattr(args, "command_line_flags", None)
        args = compat.translate(args, given if given is not None else _non_default_flags(args))
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if args.train_iters is not None and args.train_samples is not None:
        raise ArgumentError(f"give one of --train-iters {args.train_iters} and --train-samples {args.train_samples} "
                            f"(Megatron-LM counts a run in iterations or in samples)")
    if args.dry_run_world_size is not None and args.dry_run_world_size < 1:
        raise ArgumentError(f"--dry-run-world-size must be positive, got {args.dry_run_world_size}")
    if world_size is None:
        world_size = args.dry_run_world_size if args.dry_run and args.dry_run_world_size else _world_size()
    if args.context_parallel_size != 1:
        raise ArgumentError("--context-parallel-size is not supported: FPDT occupies megatron-core's context-"
                            "parallel axis; use --fpdt --fpdt-parallel-size N instead")
    if args.fpdt_parallel_size > 1 and not args.fpdt:
        raise ArgumentError(f"--fpdt-parallel-size {args.fpdt_parallel_size} needs --fpdt")
    for name in ("fpdt_chunk_size", "fpdt_offload"):
        if getattr(args, name) and not args.fpdt:
            raise ArgumentError(f"--{name.replace('_', '-')} needs --fpdt")
    if args.reset_attention_mask:
        raise ArgumentError("--reset-attention-mask is not supported: FPDT and the baseline attend causally over "
                            "the whole sequence (no per-document masks); drop it (--reset-position-ids and "
                            "--eod-mask-loss do work)")
    try:
        data = DataConfig(**_fields(DataConfig, args))
        tokenizer = _fields(TokenizerConfig, args)
        if args.tokenizer_type is None:
            if not args.mock_data:
                raise ValueError("--data-path needs the tokenizer it was made with: set --tokenizer-type (and its "
                                 "files)")
            if args.vocab_size is None:
                raise ValueError("--mock-data without a tokenizer needs --vocab-size")
            tokenizer["tokenizer_type"] = "NullTokenizer"
        model = ModelConfig(**{**_fields(ModelConfig, args), "num_query_groups": args.num_query_groups
                               if args.group_query_attention else None})
        parallel = ParallelConfig(**{**_fields(ParallelConfig, args), "world_size": world_size,
                                     "virtual_pipeline_model_parallel_size": _virtual_stages(args)})
        training = TrainingConfig(**_fields(TrainingConfig, args))
        fpdt = FPDTConfig(fpdt_parallel_size=args.fpdt_parallel_size, fpdt_chunk_size=args.fpdt_chunk_size,
                          fpdt_offload=args.fpdt_offload,
                          offload_dir=args.offload_dir if args.fpdt_offload else None) if args.fpdt else None
        config = RunConfig(model=model, training=training, data=data, parallel=parallel,
                           tokenizer=TokenizerConfig(**tokenizer),
                           checkpoint=CheckpointConfig(**_fields(CheckpointConfig, args)), fpdt=fpdt)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if config.training.fp16 and not runtime.current().cuda:
        raise ArgumentError("--fp16 needs a GPU (loss scaling lives in megatron-core's GPU optimizer); use "
                            "--bf16 or float32 on the CPU")
    problem = (compat.flash_attention_problem(args, cuda=runtime.current().cuda)
               or compat.check_deepspeed_accumulation(args, config.num_microbatches,
                                                      config.parallel.data_parallel_size))
    if problem:
        raise ArgumentError(problem)
    problem = check_files(config)
    if problem:
        raise ArgumentError(problem)
    try:
        load_tokenizer(config.tokenizer)  # readable as the tokenizer it is said to be
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    return config


def _non_default_flags(args: argparse.Namespace) -> frozenset:
    """For a namespace not made by parse_args: the dests whose value is not the parser's default."""
    parser = build_parser()
    for action in parser._actions:
        action.required = False
    defaults = vars(parser.parse_known_args([])[0])
    return frozenset(dest for dest, value in vars(args).items() if dest in defaults and value != defaults[dest])


def startup_notes(args: argparse.Namespace) -> list:
    """The one-line notes on accepted flags that change nothing here (printed once at start)."""
    return compat.notes(args, cuda=runtime.current().cuda)


def _normalization(text: str) -> str:
    """``--normalization``'s value in Megatron-LM's spelling (DeepSpeed's scripts write rmsnorm)."""
    return {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}.get(text.lower(), text)


def check_files(config: RunConfig) -> Optional[str]:
    """What to change when a file or directory the run names is missing or unusable, else None."""
    problem = check_tokenizer_args(config.tokenizer)
    if problem:
        return problem
    load, save = config.checkpoint.load, config.checkpoint.save
    if load is not None and not os.path.isdir(load) and (save is None or os.path.realpath(load) != os.path.realpath(save)):
        # --load DIR --save DIR (resume if there is something to resume) may start with no DIR yet
        return f"--load {load} does not exist; give the directory a run saved into (or the --save directory)"
    log = config.training.loss_log_file
    for flag, value, directory in (("--save", save, save),
                                   ("--data-cache-path", config.data.data_cache_path, config.data.data_cache_path),
                                   ("--loss-log-file", log, os.path.dirname(os.path.abspath(log)) if log else None)):
        problem = _check_writable_dir(f"{flag} {value}", directory) if directory is not None else None
        if problem:
            return problem
    if load is not None and os.path.isdir(load) and os.path.realpath(load) != os.path.realpath(save or ""):
        from megatron.training.checkpointing import MANIFEST, list_checkpoints

        if os.path.exists(os.path.join(load, MANIFEST)):
            return (f"--load {load} is one checkpoint; give the directory that holds it ("
                    f"{os.path.dirname(os.path.abspath(load))})")
        if not list_checkpoints(load):
            return (f"--load {load} holds no checkpoint (no iter_XXXXXXX directory): this run would train from "
                    f"scratch; give the directory a run saved into, or drop --load")
    if config.training.offload_dir is not None:
        try:
            check_offload_dir(config.training.offload_dir)
        except ValueError as e:
            return str(e)
    if not config.data.mock_data:
        for prefix in config.data.prefixes:
            missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                return (f"--data-path {prefix}: {' and '.join(prefix + e for e in missing)} not found "
                        f"(make it with tools/preprocess_data.py)")
            problem = check_dataset_files(prefix)
            if problem:
                return problem
        try:  # every split the run reads must get documents of every dataset
            resolve_split(config.data.split, config.data.prefixes,
                          ("train", "validation") if config.training.eval_iters else ("train",))
        except ValueError as e:
            return str(e)
    return None


def _check_writable_dir(given: str, directory: str) -> Optional[str]:
    """Why files could not be written under ``directory`` (that the flag and value ``given`` name),
    found now rather than at the first save hours in: a file in its place or on its path, a parent
    not writable; else None."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{given}: {path} is a file, not a directory; give another path"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{given}: {path} is not writable by this user; give a writable directory"
    return None
