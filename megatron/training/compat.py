"""Flags of Megatron-LM's and Megatron-DeepSpeed's launch scripts that are not our own: the one table.

Every such flag has one verdict here (docs/MIGRATING.md prints the same table):

    honoured   the flag's meaning there, translated onto our flags by :func:`translate`
    noted      accepted; it changes nothing here, and :func:`notes` says why, in one line printed
               once at the start of the run (and of --dry-run)
    refused    an error that names the flag and says what to use instead

Flags whose meaning is one of ours already are defined with the others in arguments.py (the
sample-based schedule, ``--overlap-grad-reduce``, ...); the aliases and translations live here.
DeepSpeed's JSON config (``--deepspeed_config``) is read by :func:`translate` too: its fields that
have a flag here become that flag, a few are noted, every other field is refused by name, and a
field that disagrees with a flag given on the command line is refused naming both.

Everything here is a pure function of the parsed flags (and the JSON file): ``translate`` returns
a new namespace and raises ``ValueError`` with what to change; validate_args turns that into its
usage error before anything is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

HONOURED, NOTED, REFUSED = "honoured", "noted", "refused"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One foreign flag: its spellings, whether it takes a value, its verdict and why (what to use)."""

    names: Tuple[str, ...]
    verdict: str
    why: str
    value: bool = False  # takes a value (else a switch)
    nargs: Optional[str] = None  # for a flag that takes several values ("+")
    # for a noted flag: values that would change something here (refused, with ``why`` ...)
    refuse_unless: Optional[Callable[[str], bool]] = None
    refusal: str = ""


def _is(*values: str) -> Callable[[str], bool]:
    return lambda given: all(v in values for v in (given if isinstance(given, list) else [given]))


_FLASH = Flag(("--use-flash-attn", "--use-flash-attn-v1", "--use-flash-attn-v2", "--use-flash-attn-triton"),
              HONOURED, "attention through a flash kernel: the kernel adapter (fpdt_ext/core/kernels.py) picks "
              "flash-attn if installed, else torch's flash kernel, for bf16/fp16 on GPU and any dtype on the "
              "CPU; float32 on GPU is refused (no flash kernel takes it)")

# Translated onto our flags by translate() (the flags that already are ours are in arguments.py).
_HONOURED = (
    Flag(("--num-key-value-heads",), HONOURED, "DeepSpeed's GQA spelling: --group-query-attention "
         "--num-query-groups N", value=True),
    Flag(("--use-rotary-position-embeddings",), HONOURED, "DeepSpeed's: --position-embedding-type rope"),
    Flag(("--rotary-position-embeddings-theta",), HONOURED, "DeepSpeed's: --rotary-base", value=True),
    Flag(("--no-pipeline-parallel",), HONOURED, "DeepSpeed's: no pipeline (--pipeline-model-parallel-size 1)"),
    Flag(("--checkpoint-activations",), HONOURED, "Megatron-DeepSpeed's: --recompute-granularity full"),
    Flag(("--checkpoint-in-cpu",), HONOURED, "DeepSpeed's: checkpointed layer inputs in host memory: "
         "--offload-recompute-inputs (with full recompute)"),
    Flag(("--recompute-activations",), HONOURED, "Megatron-LM's: --recompute-granularity selective"),
    Flag(("--activations-checkpoint-method",), HONOURED, "the old name of --recompute-method", value=True),
    Flag(("--zero-stage",), HONOURED, "DeepSpeed's ZeRO stage: 0 none, 1 --use-distributed-optimizer, 2 and 3 "
         "--use-torch-fsdp2 (parameters, gradients and optimizer state sharded)", value=True),
    Flag(("--deepspeed_config", "--deepspeed-config"), HONOURED, "DeepSpeed's JSON config: its batch, "
         "clipping, precision and ZeRO fields become our flags (read_deepspeed_config)", value=True),
    _FLASH,
)

_NOTED = (
    Flag(("--use-mcore-models",), NOTED, "models here are always megatron-core's"),
    Flag(("--deepspeed",), NOTED, "DeepSpeed's engine is not used: megatron-core's DDP and optimizer train "
         "(--deepspeed_config's fields still apply)"),
    Flag(("--deepspeed-activation-checkpointing",), NOTED, "recompute is megatron-core's "
         "(--checkpoint-activations / --recompute-granularity full)"),
    Flag(("--no-ds-sequence-parallel-fpdt-pin-memory", "--ds-sequence-parallel-fpdt-pin-memory"), NOTED,
         "FPDT's host buffers are pinned on CUDA and allocated once, then recycled (fpdt_ext/memory/offload.py)"),
    Flag(("--no-create-attention-mask-in-dataloader",), NOTED, "no attention mask is made: attention is causal "
         "by kernel"),
    Flag(("--dataloader-type",), NOTED, "samples are read in the dataset's (shuffled) order from the "
         "consumed-sample position, as Megatron's single (cyclic's extra shuffle per epoch is not made)",
         value=True, refuse_unless=_is("single", "cyclic"),
         refusal="only single/cyclic sampling exists here"),
    Flag(("--num-workers",), NOTED, "micro batches are read in the training process", value=True),
    Flag(("--distributed-backend",), NOTED, "the backend is gloo on the CPU and nccl on GPU (fpdt_ext.runtime)",
         value=True),
    Flag(("--data-impl",), NOTED, ".bin/.idx datasets are always memory-mapped", value=True,
         refuse_unless=_is("mmap", "infer"), refusal="only mmap datasets exist here (tools/preprocess_data.py)"),
    Flag(("--no-mmap-bin-files",), NOTED, ".bin files are memory-mapped (read-only; the OS pages them)"),
    Flag(("--log-throughput",), NOTED, "throughput (tokens/s, TFLOP/s, MFU) is always printed"),
    Flag(("--manual-gc",), NOTED, "Python's garbage collector runs as usual"),
    Flag(("--manual-gc-interval",), NOTED, "Python's garbage collector runs as usual", value=True),
    Flag(("--empty-unused-memory-level",), NOTED, "the allocator's cache is not emptied between steps",
         value=True),
    Flag(("--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
          "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion", "--no-rope-fusion",
          "--no-persist-layer-norm", "--cross-entropy-loss-fusion", "--no-async-tensor-model-parallel-allreduce",
          "--async-tensor-model-parallel-allreduce"), NOTED,
         "fusions are chosen here by what the device supports (megatron.training.models.transformer_config)"),
    Flag(("--ckpt-format",), NOTED, "checkpoints are megatron-core's distributed (torch_dist) format, with "
         "--use-megatron-fsdp too (Megatron-LM's fsdp_dtensor is not written: a Megatron-FSDP checkpoint here loads "
         "unsharded and into the converter)", value=True,
         refuse_unless=_is("torch_dist", "fsdp_dtensor"), refusal="checkpoints here are torch_dist only (tools/checkpoint/ "
                                                  "converts from and to Hugging Face)"),
    Flag(("--tiktoken-pattern",), NOTED, "no tiktoken tokenizer here (it only applies to one)", value=True),
    Flag(("--no-position-embedding",), NOTED, "no learned position embedding is made with rope "
         "(refused with learned_absolute positions)"),
    Flag(("--grad-reduce-in-bf16",), NOTED, "gradients are reduced in float32 here (more precise, more bytes)"),
    Flag(("--overlap-param-gather",), NOTED, "the distributed optimizer gathers parameters after its step, not "
         "overlapped with the next forward (the same values)"),
    Flag(("--use-checkpoint-opt_param-scheduler",), NOTED, "a resumed run takes its LR schedule from the "
         "checkpoint already"),
    Flag(("--calculate-per-token-loss",), NOTED, "the loss is the token mean of each micro batch, averaged: the "
         "same as per-token with equal token counts (refused with --eod-mask-loss)"),
    Flag(("--hysteresis",), NOTED, "fp16 loss scaling uses megatron-core's dynamic scaler (hysteresis 2)",
         value=True, refuse_unless=_is("2"), refusal="the loss scaler's hysteresis is 2 here"),
    Flag(("--attention-backend",), NOTED, "attention kernels are chosen by the kernel adapter "
         "(fpdt_ext/core/kernels.py: flash where the dtype allows) and by TransformerEngine's spec for the "
         "baseline when it is installed", value=True, refuse_unless=_is("auto", "flash", "fused"),
         refusal="unfused/local attention (materialised scores) is not offered; use auto or flash"),
    Flag(("--expert-model-parallel-size",), NOTED, "no experts here (dense models)", value=True,
         refuse_unless=_is("1"), refusal="no mixture-of-experts here: dense models only"),
    Flag(("--num-experts",), NOTED, "one expert per MLP is the dense model (Megatron-DeepSpeed's dense scripts "
         "pass it)", value=True, nargs="+", refuse_unless=_is("1"), refusal="no mixture-of-experts here: dense "
                                                                             "models only"),
    Flag(("--moe-expert-parallel-size",), NOTED, "no experts here (dense models)", value=True,
         refuse_unless=_is("1"), refusal="no mixture-of-experts here: dense models only"),
    Flag(("--moe-loss-coeff", "--moe-train-capacity-factor", "--moe-eval-capacity-factor", "--moe-min-capacity"),
         NOTED, "Megatron-DeepSpeed's MoE settings do nothing in a dense model (more experts are refused)",
         value=True),
    Flag(("--log-batch-size-to-tensorboard",), NOTED, "TensorBoard's batch-size scalar is always written with "
         "--tensorboard-dir"),
    Flag(("--log-optimizer-states-to-tensorboard",), NOTED, "optimizer-state norms are not logged here (the "
         "gradient norm is)"),
    Flag(("--timing-log-level",), NOTED, "the step timers are those of --log-timers-to-tensorboard", value=True),
    Flag(("--logging-level",), NOTED, "the log is print-based (rank 0), without levels", value=True),
    Flag(("--record-memory-history",), NOTED, "the peak device memory is in every log line; use --profile for "
         "a memory timeline"),
    Flag(("--init-model-with-meta-device",), NOTED, "the model is built on its device (or on the CPU with "
         "use_cpu_initialization); tools/checkpoint/stream.py uses the meta device for export"),
    Flag(("--no-query-key-layer-scaling",), NOTED, "no query-key layer scaling here already (megatron-core's "
         "default)"),
    Flag(("--attention-softmax-in-fp32",), NOTED, "the attention kernels keep the softmax in float32"),
    Flag(("--recompute-modules",), NOTED, "selective recompute covers core attention (megatron-core's "
         "default)", value=True, nargs="+", refuse_unless=_is("core_attn"),
         refusal="selective recompute covers core_attn only here; use --recompute-granularity full for more"),
    Flag(("--optimizer",), NOTED, "the optimizer is Adam(W), megatron-core's (HostAdamW on the CPU)", value=True,
         refuse_unless=_is("adam"), refusal="Adam is the only optimizer here"),
    Flag(("--DDP-impl",), NOTED, "data parallelism is megatron-core's DDP", value=True,
         refuse_unless=_is("local", "torch"), refusal="for FSDP use --use-torch-fsdp2 or "
                                                      "--use-megatron-fsdp; for ZeRO-1 --use-distributed-optimizer"),
    Flag(("--loss-scale",), NOTED, "loss scaling is megatron-core's dynamic scaler with --fp16 and none with "
         "--bf16 (Megatron-DeepSpeed ignores the flag under --deepspeed too); with --fp16 and without --deepspeed "
         "it is refused", value=True),
    Flag(("--transformer-impl",), NOTED, "the baseline uses TransformerEngine's layer spec on GPU when it is "
         "installed, else megatron-core's local spec with torch attention; FPDT layers have their own spec",
         value=True, refuse_unless=_is("local", "transformer_engine"), refusal="use local or transformer_engine"),
)

_REFUSED = (
    Flag(("--fp8-format", "--fp8-amax-history-len", "--fp8-amax-compute-algo"), REFUSED, "FP8 needs "
         "TransformerEngine's FP8 layers, not used here: use --bf16", value=True),
    Flag(("--fp8-param-gather",), REFUSED, "FP8 needs TransformerEngine's FP8 layers, not used here: use --bf16"),
    Flag(("--cpu-optimizer",), REFUSED, "DeepSpeed's CPU Adam is not used here: use --use-distributed-optimizer "
         "to shard the optimizer state"),
    Flag(("--universal-checkpoint",), REFUSED, "DeepSpeed universal checkpoints are not read: torch_dist "
         "checkpoints load at any TP/FPDT/DP size, and tools/checkpoint/convert.py converts from Hugging Face"),
    Flag(("--enable-zbh1-pipeline", "--enable-zbh1-exact-semantics"), REFUSED, "DeepSpeed's zero-bubble schedule "
         "is not offered: --pipeline-model-parallel-size runs megatron-core's 1F1B, or its interleaved schedule with "
         "--num-virtual-stages-per-pipeline-rank"),
    Flag(("--kd", "--mos", "--random-ltd", "--data-efficiency-curriculum-learning", "--reset-iteration",
          "--create-moe-param-group", "--disable-moe-token-dropping"), REFUSED, "DeepSpeed's distillation, "
         "compression, data-efficiency and MoE options are not offered here: drop it"),
    Flag(("--load-teacher", "--num-layers-teacher", "--hidden-size-teacher", "--num-attention-heads-teacher",
          "--kd-beta-ce", "--kd-temp", "--kd-alpha-ce", "--train-doc-idx-path", "--train-sample-idx-path",
          "--train-shuffle-idx-path", "--mlp-type"), REFUSED, "DeepSpeed's distillation, data-efficiency and PR-MoE "
         "options are not offered here: drop it", value=True),
    Flag(("--moe-router-topk", "--moe-router-load-balancing-type", "--moe-aux-loss-coeff",
          "--moe-token-dispatcher-type"), REFUSED, "no mixture-of-experts here: dense models only", value=True),
    Flag(("--moe-grouped-gemm",), REFUSED, "no mixture-of-experts here: dense models only"),
)

TABLE: Tuple[Flag, ...] = _HONOURED + _NOTED + _REFUSED


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    """Register every flag of the table (documentation: docs/MIGRATING.md)."""
    g = parser.add_argument_group("Megatron-LM / DeepSpeed flags (docs/MIGRATING.md: honoured, noted or refused)")
    for flag in TABLE:
        for name in flag.names:  # each spelling its own dest: a note or refusal names the one given
            dest = _dest(name)
            shown = f"{flag.verdict}: {flag.why}".replace("%", "%%")
            if flag.value:
                g.add_argument(name, dest=dest, default=None, nargs=flag.nargs, metavar="VALUE", help=shown)
            else:
                g.add_argument(name, dest=dest, action="store_true", default=False, help=shown)


def _dest(name: str) -> str:
    """Each spelling its own dest (--deepspeed_config and --deepspeed-config too)."""
    return "compat_" + name.lstrip("-").replace("_", "__").replace("-", "_")


def _given(args, name: str):
    """The value of foreign flag ``name`` on the command line (True for a switch), or None."""
    value = getattr(args, _dest(name), None)
    return None if value is False else value


def given_flags(args, flag: Flag) -> List[Tuple[str, object]]:
    return [(name, _given(args, name)) for name in flag.names if _given(args, name) is not None]


def _spell(name: str, value) -> str:
    if value is True:
        return name
    return f"{name} {' '.join(value) if isinstance(value, list) else value}"


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} {value}: give an integer") from None


def _set_flag(out: argparse.Namespace, given: FrozenSet[str], dest: str, value, source: str) -> None:
    """Set our flag ``dest`` to ``value`` on behalf of ``source``; a different value given on the
    command line is a conflict naming both."""
    current = getattr(out, dest)
    flag = "--" + dest.replace("_", "-")
    if dest in given and current != value:
        shown = flag if current is True else f"{flag} {current}"
        raise ValueError(f"{source} and {shown} disagree: give one of them")
    setattr(out, dest, value)


def translate(args: argparse.Namespace, given: FrozenSet[str]) -> argparse.Namespace:
    """A copy of ``args`` with the honoured foreign flags turned into ours and the DeepSpeed JSON
    applied; ``given`` holds the dests set on the command line (a translation that disagrees with
    one of them is refused naming both). Raises ValueError for a refused flag or value."""
    for flag in TABLE:
        for name, value in given_flags(args, flag):
            if flag.verdict == REFUSED:
                raise ValueError(f"{_spell(name, value)} is not supported: {flag.why}")
            if flag.refuse_unless is not None and not flag.refuse_unless(value):
                raise ValueError(f"{_spell(name, value)} is not supported: {flag.refusal}")
    out = argparse.Namespace(**vars(args))
    if args.tokenizer_type is None and args.vocab_file and args.merge_file:
        out.tokenizer_type = "GPT2BPETokenizer"  # Megatron-LM's and DeepSpeed's pretrain_gpt.py default
    if _given(args, "--calculate-per-token-loss") and args.eod_mask_loss:
        raise ValueError("--calculate-per-token-loss with --eod-mask-loss is not supported: the loss here is the "
                         "token mean of each micro batch, averaged over micro batches; drop one of them")
    kv = _given(args, "--num-key-value-heads")
    if kv is not None:
        heads = _int("--num-key-value-heads", kv)
        _set_flag(out, given, "num_query_groups", heads, f"--num-key-value-heads {kv}")
        out.group_query_attention = heads != args.num_attention_heads or args.group_query_attention
    if _given(args, "--use-rotary-position-embeddings"):
        _set_flag(out, given, "position_embedding_type", "rope", "--use-rotary-position-embeddings")
    theta = _given(args, "--rotary-position-embeddings-theta")
    if theta is not None:
        try:
            base = float(theta)
        except ValueError:
            raise ValueError(f"--rotary-position-embeddings-theta {theta}: give a number") from None
        _set_flag(out, given, "rotary_base", base, f"--rotary-position-embeddings-theta {theta}")
    if _given(args, "--no-pipeline-parallel") and args.pipeline_model_parallel_size != 1:
        raise ValueError(f"--no-pipeline-parallel and --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size} disagree: give one of them")
    if _given(args, "--no-position-embedding") and out.position_embedding_type == "learned_absolute":
        raise ValueError("--no-position-embedding with learned absolute positions is not supported: give "
                         "--position-embedding-type rope (a model needs positions)")
    if _given(args, "--checkpoint-activations"):
        _set_flag(out, given, "recompute_granularity", "full", "--checkpoint-activations")
    scale = _given(args, "--loss-scale")
    if scale is not None and args.fp16 and not _given(args, "--deepspeed"):
        raise ValueError(f"--loss-scale {scale} is not supported: a static fp16 loss scale is not offered here; "
                         f"drop it (megatron-core's dynamic scaler) or use --bf16")
    if _given(args, "--recompute-activations"):
        if _given(args, "--checkpoint-activations"):
            raise ValueError("--recompute-activations (selective) and --checkpoint-activations (full) disagree: "
                             "give one of them")
        _set_flag(out, given, "recompute_granularity", "selective", "--recompute-activations")
    method = _given(args, "--activations-checkpoint-method")
    if method is not None:
        if method not in ("uniform", "block"):
            raise ValueError(f"--activations-checkpoint-method {method}: use uniform or block")
        _set_flag(out, given, "recompute_method", method, f"--activations-checkpoint-method {method}")
    if _given(args, "--checkpoint-in-cpu"):
        if out.recompute_granularity != "full":
            raise ValueError("--checkpoint-in-cpu keeps checkpointed layer inputs in host memory: it needs "
                             "--checkpoint-activations (or --recompute-granularity full)")
        out.offload_recompute_inputs = True
    stage = _given(args, "--zero-stage")
    if stage is not None:
        _apply_zero_stage(out, given, _int("--zero-stage", stage), f"--zero-stage {stage}")
    path = _given(args, "--deepspeed_config") or _given(args, "--deepspeed-config")
    out.deepspeed_gradient_accumulation_steps = None
    if path is not None:
        apply_deepspeed_config(out, given, read_deepspeed_config(path), path,
                               zero_stage_flag=None if stage is None else _int("--zero-stage", stage))
    return out


def _apply_zero_stage(out, given, stage: int, source: str) -> None:
    """ZeRO-1: the distributed optimizer; ZeRO-2 and 3: FSDP2 (sharding.py), which shards the
    parameters too, re-gathering each layer for its backward with ZeRO-3 only."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{source}: ZeRO stages are 0 to 3")
    if stage == 1:
        _set_flag(out, given, "use_distributed_optimizer", True, source)
    elif stage in (2, 3):
        _set_flag(out, given, "use_torch_fsdp2", True, source)
        out.fsdp_reshard_after_forward = stage == 3


def read_deepspeed_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise ValueError(f"--deepspeed_config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed_config {path}: the JSON must be an object")
    return config


# DeepSpeed JSON fields that change nothing here (dotted for nested ones), and why.
DEEPSPEED_NOTED: Dict[str, str] = {
    "steps_per_print": "progress is printed every --log-interval iterations",
    "wall_clock_breakdown": "no per-phase timers in the log here",
    "prescale_gradients": "gradients are averaged over data x FPDT ranks in float32 (the same result)",
    "gradient_predivide_factor": "gradients are averaged over data x FPDT ranks in float32 (the same result)",
    "zero_allow_untested_optimizer": "the optimizer is megatron-core's Adam (HostAdamW on the CPU)",
    "fp16.loss_scale": "fp16 uses megatron-core's dynamic loss scaler",
    "fp16.loss_scale_window": "fp16 uses megatron-core's dynamic loss scaler",
    "fp16.hysteresis": "fp16 uses megatron-core's dynamic loss scaler",
    "fp16.min_loss_scale": "fp16 uses megatron-core's dynamic loss scaler",
    "fp16.initial_scale_power": "fp16 uses megatron-core's dynamic loss scaler",
    "zero_optimization.reduce_bucket_size": "megatron-core's DDP sizes its buckets",
    "zero_optimization.allgather_bucket_size": "megatron-core's DDP sizes its buckets",
    "zero_optimization.contiguous_gradients": "gradients live in megatron-core's contiguous buffer",
    "zero_optimization.overlap_comm": "see --overlap-grad-reduce",
    "zero_optimization.reduce_scatter": "the distributed optimizer reduce-scatters on GPU",
    "zero_optimization.allgather_partitions": "the distributed optimizer all-gathers on GPU",
}


def apply_deepspeed_config(out, given, config: dict, path: str, *, zero_stage_flag: Optional[int] = None) -> None:
    """Our flags from DeepSpeed's JSON ``config`` (read from ``path``), into ``out``."""
    source = f"--deepspeed_config {path}:"
    known = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
             "gradient_clipping", "bf16", "fp16", "zero_optimization"} | {k for k in DEEPSPEED_NOTED if "." not in k}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{source} {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not supported here "
                         f"(docs/MIGRATING.md lists the fields read); remove {'it' if len(unknown) == 1 else 'them'}")
    mapping = (("train_micro_batch_size_per_gpu", "micro_batch_size"), ("train_batch_size", "global_batch_size"),
               ("gradient_clipping", "clip_grad"))
    for key, dest in mapping:
        if key in config and config[key] != "auto":
            _set_flag(out, given, dest, config[key], f"{source} {key} {config[key]}")
    gas = config.get("gradient_accumulation_steps")
    out.deepspeed_gradient_accumulation_steps = None if gas in (None, "auto") else gas
    for precision in ("bf16", "fp16"):
        section = config.get(precision, {})
        if not isinstance(section, dict):
            raise ValueError(f"{source} {precision} must be an object like {{\"enabled\": true}}")
        extra = sorted(set(section) - {"enabled"} - {k.split(".", 1)[1] for k in DEEPSPEED_NOTED
                                                     if k.startswith(precision + ".")})
        if extra:
            raise ValueError(f"{source} {precision}.{extra[0]} is not supported here; remove it")
        if section.get("enabled") in (True, "true"):
            _set_flag(out, given, precision, True, f"{source} {precision}.enabled true")
            if precision == "fp16" and "bf16" in given and out.bf16:
                raise ValueError(f"{source} fp16.enabled true and --bf16 disagree: give one of them")
            if precision == "bf16" and "fp16" in given and out.fp16:
                raise ValueError(f"{source} bf16.enabled true and --fp16 disagree: give one of them")
        elif section.get("enabled") in (False, "false") and precision in given and getattr(out, precision):
            raise ValueError(f"{source} {precision}.enabled false and --{precision} disagree: give one of them")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{source} zero_optimization must be an object like {{\"stage\": 1}}")
    extra = sorted(set(zero) - {"stage"} - {k.split(".", 1)[1] for k in DEEPSPEED_NOTED
                                            if k.startswith("zero_optimization.")})
    if extra:
        raise ValueError(f"{source} zero_optimization.{extra[0]} is not supported here (offload: --fpdt-offload, "
                         f"--offload-recompute-inputs, --offload-dir); remove it")
    if "stage" in zero:
        stage = zero["stage"]
        if zero_stage_flag is not None and zero_stage_flag != stage:
            raise ValueError(f"{source} zero_optimization.stage {stage} and --zero-stage {zero_stage_flag} "
                             f"disagree: give one of them")
        _apply_zero_stage(out, given, stage, f"{source} zero_optimization.stage {stage}")


def check_deepspeed_accumulation(args, num_microbatches: int, data_parallel_size: int) -> Optional[str]:
    """DeepSpeed's train_batch_size = micro x gradient_accumulation_steps x data-parallel ranks: the
    JSON's accumulation steps against the run's, or None when they agree (or were not given)."""
    gas = getattr(args, "deepspeed_gradient_accumulation_steps", None)
    if gas is None or gas == num_microbatches:
        return None
    return (f"--deepspeed_config: gradient_accumulation_steps {gas} disagrees with the run's {num_microbatches} "
            f"micro batches per step (global batch / (micro batch x {data_parallel_size} data-parallel ranks)); "
            f"fix one of them")


def notes(args: argparse.Namespace, *, cuda: bool) -> List[str]:
    """One line per accepted flag that changes nothing here (or less than there), saying why."""
    lines = []
    for flag in TABLE:
        for name, value in given_flags(args, flag):
            if flag.verdict == NOTED:
                lines.append(f"note: {_spell(name, value)} changes nothing here: {flag.why}")
    if not cuda and getattr(args, "overlap_grad_reduce", False):
        lines.append("note: --overlap-grad-reduce changes nothing on the CPU: gradients are reduced after the "
                     "last micro batch's backward (on GPU megatron-core's DDP overlaps it with backward)")
    path = _given(args, "--deepspeed_config") or _given(args, "--deepspeed-config")
    if path is not None:
        config = read_deepspeed_config(path)
        for key, why in DEEPSPEED_NOTED.items():
            head, _, tail = key.partition(".")
            present = tail in config.get(head, {}) if tail else head in config
            if present:
                lines.append(f"note: --deepspeed_config {key} changes nothing here: {why}")
    return lines


def flash_attention_problem(args, *, cuda: bool) -> Optional[str]:
    """What is wrong with ``--use-flash-attn*`` for this run, else None."""
    names = [name for name, _ in given_flags(args, _FLASH)]
    if names and cuda and not (args.bf16 or args.fp16):
        return (f"{names[0]} needs --bf16 or --fp16 on GPU: flash kernels take half precision (float32 attention "
                f"uses the memory-efficient kernel; drop {names[0]} for it)")
    return None
