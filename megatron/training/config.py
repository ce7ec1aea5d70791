"""The run configuration: one frozen object in parts, each validated when it is made.

``validate_args`` (arguments.py) turns Megatron-style flags into a :class:`RunConfig`; tools
and benchmarks build one directly. Field names are the flags' (``--num-layers`` ->
``model.num_layers``), so adding an option touches the flag and the field. A part checks
itself in ``__post_init__``; :class:`RunConfig` checks how the parts fit together (heads
against TP x FPDT, batch sizes against data parallelism, the sequence against the FPDT
chunks, ...). Every check raises ``ValueError`` with a message that says what to change,
before any process group, model or data exists.

Defaults that depend on other fields (``ffn_hidden_size`` = 4 x hidden, ``kv_channels`` =
hidden / heads, ``max_position_embeddings`` = ``seq_length``, the global batch, the LR decay
length) are resolved when the part (or the run) is made, so a config never holds a None
that means "work it out later".
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import List, Optional, Tuple

from fpdt_ext.core.config import FPDTConfig, check_heads
from fpdt_ext.mcore.parallel_state import ParallelLayout
from megatron.training.batch_schedule import BatchSchedule


def _set(obj, **values) -> None:
    """Resolve derived fields of a frozen dataclass in its ``__post_init__``."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def _positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _in_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """``value`` of flag ``name`` within [low, high] (an end excluded when ``*_open``)."""
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
        raise ValueError(f"--{name.replace('_', '-')} {value:g} is out of range: it must be {where}")


# ModelConfig's YaRN fields (used only with --position-embedding-type yarn)
_YARN_FIELDS = ("rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
                "mscale", "mscale_all_dim", "yarn_correction_range_round_to_int")


def _flag_with(name: str, value) -> str:
    """The flag that sets field ``name`` to ``value`` (a boolean field: its --no- form when false)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value:g}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's shape and arithmetic: what a checkpoint needs to be rebuilt."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None  # 4 x hidden_size
    kv_channels: Optional[int] = None  # hidden_size / num_attention_heads
    num_query_groups: Optional[int] = None  # num_attention_heads (no GQA)
    max_position_embeddings: Optional[int] = None  # the run's seq_length
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_seq_len_interpolation_factor: Optional[float] = None  # RoPE at position / factor
    # Llama 3.1's frequency scaling; the defaults of the last three are megatron-core's fixed values
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    # YaRN (--position-embedding-type yarn), with Megatron-LM's flag names; the defaults are
    # megatron-core's. Frequencies blend the interpolated (/ factor) and the original ones by their
    # rotations over the original context; cos and sin are scaled by an attention factor that
    # megatron-core derives from the factor, mscale and mscale_all_dim
    rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    openai_gelu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    qk_layernorm: bool = False
    # Megatron's --apply-layernorm-1p (megatron-core's layernorm_zero_centered_gamma): every norm
    # stores w, initialised to zero, and scales by 1 + w
    apply_layernorm_1p: bool = False
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        _positive(num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
                  kv_channels=self.kv_channels, num_query_groups=self.num_query_groups)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                                 f"{self.num_attention_heads}; set --kv-channels")
            _set(self, kv_channels=self.hidden_size // self.num_attention_heads)
        if self.ffn_hidden_size is None:
            _set(self, ffn_hidden_size=4 * self.hidden_size)
        if self.num_query_groups is None:
            _set(self, num_query_groups=self.num_attention_heads)
        if self.position_embedding_type not in ("learned_absolute", "rope", "yarn"):
            raise ValueError(f"--position-embedding-type {self.position_embedding_type}: use learned_absolute, rope "
                             f"or yarn")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization {self.normalization}: use LayerNorm or RMSNorm")
        check_heads(self.num_attention_heads, self.num_query_groups, sp_size=1)
        _positive(make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
                  max_position_embeddings=self.max_position_embeddings)
        for name in ("attention_dropout", "hidden_dropout"):
            _in_range(name, getattr(self, name), 0, 1, high_open=True)
        _in_range("rotary_percent", self.rotary_percent, 0, 1, low_open=True)
        for name in ("rotary_base", "rope_scaling_factor", "rope_scaling_low_freq_factor", "norm_epsilon",
                     "init_method_std", "rotary_scaling_factor", "yarn_beta_fast", "yarn_beta_slow"):
            _in_range(name, getattr(self, name), 0, low_open=True)
        for name in ("mscale", "mscale_all_dim"):
            _in_range(name, getattr(self, name), 0)
        _in_range("rotary_seq_len_interpolation_factor", self.rotary_seq_len_interpolation_factor, 1)
        _positive(rope_scaling_original_max_position_embeddings=self.rope_scaling_original_max_position_embeddings,
                  yarn_original_max_position_embeddings=self.yarn_original_max_position_embeddings)
        if self.rope_scaling_high_freq_factor <= self.rope_scaling_low_freq_factor:
            raise ValueError(f"--rope-scaling-high-freq-factor {self.rope_scaling_high_freq_factor:g} must be larger "
                             f"than --rope-scaling-low-freq-factor {self.rope_scaling_low_freq_factor:g}")
        scaled = [flag for flag, on in (("--use-rope-scaling", self.use_rope_scaling),
                                        ("--rotary-seq-len-interpolation-factor",
                                         self.rotary_seq_len_interpolation_factor is not None)) if on]
        if scaled and self.position_embedding_type != "rope":
            raise ValueError(f"{scaled[0]} scales RoPE: it needs --position-embedding-type rope (this model has "
                             f"{self.position_embedding_type})")
        if self.yarn_beta_fast < self.yarn_beta_slow:
            raise ValueError(f"--yarn-beta-fast {self.yarn_beta_fast:g} must be at least --yarn-beta-slow "
                             f"{self.yarn_beta_slow:g}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        yarn = [_flag_with(name, getattr(self, name)) for name in _YARN_FIELDS if getattr(self, name) != defaults[name]]
        if yarn and self.position_embedding_type != "yarn":
            raise ValueError(f"{yarn[0]} is YaRN's: it needs --position-embedding-type yarn (this model has "
                             f"{self.position_embedding_type})")

    @property
    def rotary(self) -> bool:
        """Rotary position embeddings: RoPE (plain or scaled) or YaRN."""
        return self.position_embedding_type in ("rope", "yarn")

    @property
    def group_query_attention(self) -> bool:
        return self.num_query_groups != self.num_attention_heads


# Megatron-LM's --data-parallel-sharding-strategy: what Megatron-FSDP shards over data x FPDT ranks
SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the world's ranks split the work (world = TP x FPDT x PP x DP)."""

    world_size: int = 1
    tensor_model_parallel_size: int = 1
    fpdt_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Megatron-LM's interleaved schedule: model chunks per pipeline rank (from --num-virtual-stages-per-
    # pipeline-rank or --num-layers-per-virtual-pipeline-stage); None: one chunk (1F1B)
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # Megatron-LM's uneven split: the first / last stage's layers; the others share the rest evenly
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    sequence_parallel: bool = False  # Megatron-SP, within the TP group
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  # megatron-core DDP's bucketed reduction during backward (GPU)
    # parameters, gradients and optimizer state sharded over data x FPDT ranks (torch FSDP2; sharding.py)
    use_torch_fsdp2: bool = False
    fsdp_reshard_after_forward: bool = True  # ZeRO-3; False (ZeRO-2 given to DeepSpeed's flags) keeps layers
    # gathered from their forward to their backward
    # megatron-core's Megatron-FSDP (megatron_fsdp.py) with Megatron-LM's strategy names; on the CPU
    # the same sharding by the implementations above (cpu_equivalent)
    use_megatron_fsdp: bool = False
    data_parallel_sharding_strategy: str = "no_shard"
    distributed_timeout_minutes: int = 30

    def __post_init__(self):
        self.layout  # validates the sizes
        pp = self.pipeline_model_parallel_size
        if pp == 1 and (self.virtual_pipeline_model_parallel_size or self.decoder_first_pipeline_num_layers
                        is not None or self.decoder_last_pipeline_num_layers is not None):
            raise ValueError("virtual pipeline stages and uneven stage sizes need --pipeline-model-parallel-size "
                             "> 1")
        if self.virtual_pipeline_model_parallel_size == 1:
            _set(self, virtual_pipeline_model_parallel_size=None)  # one chunk per rank: plain 1F1B
        if self.virtual_pipeline_model_parallel_size is not None and self.virtual_pipeline_model_parallel_size < 1:
            raise ValueError(f"virtual pipeline stages per rank must be positive, got "
                             f"{self.virtual_pipeline_model_parallel_size}")
        if self.use_torch_fsdp2:
            if self.use_distributed_optimizer:
                raise ValueError("--use-torch-fsdp2 shards the optimizer state already: drop "
                                 "--use-distributed-optimizer")
        strategy = self.data_parallel_sharding_strategy
        if strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"--data-parallel-sharding-strategy {strategy}: use one of "
                             f"{', '.join(SHARDING_STRATEGIES)}")
        if self.use_megatron_fsdp:
            if self.use_torch_fsdp2:
                raise ValueError("--use-megatron-fsdp and --use-torch-fsdp2 are two sharding implementations: give "
                                 "one of them")
            if strategy == "no_shard":
                raise ValueError("--use-megatron-fsdp needs --data-parallel-sharding-strategy optim, optim_grads or "
                                 "optim_grads_params (no_shard is plain data parallelism: drop --use-megatron-fsdp)")
            if self.pipeline_model_parallel_size > 1:
                raise ValueError("--use-megatron-fsdp does not take pipeline stages: megatron-core 0.16's Megatron-FSDP "
                                 "lays its device mesh over every rank as data x context x tensor parallel, with no "
                                 "pipeline axis (as in Megatron-LM). Use --use-torch-fsdp2, which shards each stage "
                                 "over its data x FPDT ranks")
        elif strategy != "no_shard":
            raise ValueError(f"--data-parallel-sharding-strategy {strategy} is Megatron-FSDP's: add "
                             f"--use-megatron-fsdp (or use --use-torch-fsdp2 / --use-distributed-optimizer)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            _set(self, sequence_parallel=False)  # as Megatron: meaningless without TP

    def cpu_equivalent(self) -> "ParallelConfig":
        """With --use-megatron-fsdp on the CPU (Megatron-FSDP needs CUDA streams): the same sharding
        by this project's implementations: optim the distributed optimizer (ZeRO-1), optim_grads
        FSDP2 keeping each layer gathered from its forward to its backward (ZeRO-2's traffic),
        optim_grads_params FSDP2 (ZeRO-3). Unchanged otherwise."""
        if not self.use_megatron_fsdp:
            return self
        strategy = self.data_parallel_sharding_strategy
        return dataclasses.replace(self, use_megatron_fsdp=False, data_parallel_sharding_strategy="no_shard",
                                   use_distributed_optimizer=strategy == "optim",
                                   use_torch_fsdp2=strategy != "optim",
                                   fsdp_reshard_after_forward=strategy == "optim_grads_params")

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(world_size=self.world_size, tensor_model_parallel_size=self.tensor_model_parallel_size,
                              fpdt_parallel_size=self.fpdt_parallel_size,
                              pipeline_model_parallel_size=self.pipeline_model_parallel_size)

    @property
    def data_parallel_size(self) -> int:
        return self.layout.data_parallel_size

    @property
    def model_chunks(self) -> int:
        """Model chunks on each rank: the virtual stages per pipeline rank (1 without interleaving)."""
        return self.virtual_pipeline_model_parallel_size or 1

    def stage_layers(self, num_layers: int) -> List[int]:
        """Layers of each pipeline stage, in order (Megatron-LM's split: the first and last stage
        as given, the rest evenly); raises ValueError with what to change when they do not split."""
        pp, vp = self.pipeline_model_parallel_size, self.model_chunks
        first, last = self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
        given = [n for n in (first, last) if n is not None]
        if any(n < 0 for n in given):
            raise ValueError("--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers must not be "
                             "negative")
        middle_stages = pp - len(given)
        rest = num_layers - sum(given)
        if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and rest % middle_stages):
            raise ValueError(
                f"--num-layers {num_layers} does not split over {pp} pipeline stages"
                + (" with " + " and ".join(f"{n} on the {where} stage" for n, where in
                                           zip((first, last), ("first", "last")) if n is not None)
                   if given else "")
                + f": use a number of layers that {middle_stages or 1} stage(s) share evenly, or change "
                  f"--pipeline-model-parallel-size / --decoder-first-pipeline-num-layers / "
                  f"--decoder-last-pipeline-num-layers")
        per = rest // middle_stages if middle_stages else 0
        layers = [per] * pp
        if first is not None:
            layers[0] = first
        if last is not None:
            layers[-1] = last
        if vp > 1 and any(n % vp for n in layers):
            raise ValueError(f"each pipeline stage's layers ({layers}) must split into the {vp} virtual stages per "
                             f"rank evenly: change --num-layers-per-virtual-pipeline-stage / "
                             f"--num-virtual-stages-per-pipeline-rank")
        return layers


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Lengths, batches, the optimizer and its schedule, precision, recompute, logging."""

    seq_length: int
    train_iters: Optional[int] = None  # set by RunConfig from train_samples / train_tokens when given
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # micro batch x data-parallel size (set by RunConfig)
    # Megatron's batch ramp-up (batch_schedule.py): the global batch grows with the samples consumed,
    # to global_batch_size (the final batch)
    rampup_batch_size: Optional[Tuple[int, ...]] = None  # START INCREMENT SAMPLES
    step_batch_size_schedule: Optional[str] = None  # "THRESHOLD:BATCH ...", thresholds in tokens
    lr: float = 1e-4
    min_lr: float = 0.0
    # Megatron-LM's --decoupled-lr / --decoupled-min-lr: the peak and final LR of the input
    # embedding and output layer weights (megatron-core's is_embedding_or_output_parameter)
    decoupled_lr: Optional[float] = None
    decoupled_min_lr: Optional[float] = None  # min_lr when not given
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # train_iters (iteration-based runs)
    lr_decay_style: str = "linear"
    # Megatron-LM's sample-based schedule (train_samples instead of train_iters; its LR lengths in
    # samples), its warmup as a fraction of the decay, and DeepSpeed's token counts (tokens =
    # samples x seq_length). RunConfig turns them into iterations of its global batch: lr_schedule.
    train_samples: Optional[int] = None
    lr_warmup_samples: int = 0
    lr_decay_samples: Optional[int] = None  # train_samples
    lr_warmup_fraction: Optional[float] = None
    train_tokens: Optional[int] = None  # stop once this many tokens are consumed (DeepSpeed's)
    lr_warmup_tokens: Optional[int] = None
    lr_decay_tokens: Optional[int] = None
    override_opt_param_scheduler: bool = False  # on resume: these lengths and LRs, not the checkpoint's
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    fp16: bool = False
    seed: int = 1234
    recompute_granularity: Optional[str] = None  # "full"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    offload_recompute_inputs: bool = False
    offload_dir: Optional[str] = None
    log_interval: int = 100
    eval_interval: int = 1000
    eval_iters: int = 100
    peak_tflops: Optional[float] = None
    loss_log_file: Optional[str] = None
    check_for_nan_in_loss_and_grad: bool = True  # stop at a non-finite loss or gradient norm

    def __post_init__(self):
        _positive(seq_length=self.seq_length, train_iters=self.train_iters, train_samples=self.train_samples,
                  lr_decay_samples=self.lr_decay_samples, train_tokens=self.train_tokens,
                  lr_decay_tokens=self.lr_decay_tokens, micro_batch_size=self.micro_batch_size,
                  global_batch_size=self.global_batch_size, log_interval=self.log_interval,
                  eval_interval=self.eval_interval, recompute_num_layers=self.recompute_num_layers)
        _positive(lr_decay_iters=self.lr_decay_iters)
        for name in ("eval_iters", "lr_warmup_iters", "seed", "lr_warmup_samples", "lr_warmup_tokens"):
            _in_range(name, getattr(self, name), 0)
        _in_range("lr_warmup_fraction", self.lr_warmup_fraction, 0, 1, high_open=True)
        for name in ("lr", "min_lr", "decoupled_lr", "decoupled_min_lr", "weight_decay",
                     "clip_grad"):  # --clip-grad 0: no clipping, as Megatron
            _in_range(name, getattr(self, name), 0)
        for name in ("adam_beta1", "adam_beta2"):
            _in_range(name, getattr(self, name), 0, 1, high_open=True)
        _in_range("adam_eps", self.adam_eps, 0, low_open=True)
        _in_range("peak_tflops", self.peak_tflops, 0, low_open=True)
        if self.bf16 and self.fp16:
            raise ValueError("choose one of --bf16 and --fp16")
        _check_schedule_units(self)
        if self.rampup_batch_size is not None:
            _set(self, rampup_batch_size=tuple(self.rampup_batch_size))
        batches = self.batch_schedule  # checked here
        if batches is not None and self.global_batch_size is None:
            _set(self, global_batch_size=batches.final)  # a step schedule ends at the final batch
        if self.lr_decay_iters is None and self.train_iters is not None and self.train_samples is None:
            _set(self, lr_decay_iters=self.train_iters)
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ValueError("--decoupled-min-lr needs --decoupled-lr (the embedding and output layer's peak LR)")
        if self.decoupled_lr is not None and self.decoupled_lr_range[0] > self.decoupled_lr:
            raise ValueError(f"--decoupled-min-lr {self.decoupled_lr_range[0]} is above --decoupled-lr "
                             f"{self.decoupled_lr}" + ("" if self.decoupled_min_lr is not None else
                                                     " (it defaults to --min-lr)"))
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity {self.recompute_granularity}: use full or selective")
        if self.offload_recompute_inputs and self.recompute_granularity != "full":
            raise ValueError("--offload-recompute-inputs needs --recompute-granularity full")

    def lr_schedule(self, global_batch_size: int) -> "LRSchedule":
        """The run's length and LR schedule: in iterations of ``global_batch_size`` sequences, or in
        samples with a batch ramp-up."""
        return lr_schedule(self, global_batch_size)

    @functools.cached_property
    def batch_schedule(self) -> Optional[BatchSchedule]:
        """The global batch's ramp-up, None for a constant batch."""
        return BatchSchedule.from_flags(rampup_batch_size=self.rampup_batch_size,
                                        step_batch_size_schedule=self.step_batch_size_schedule,
                                        global_batch_size=self.global_batch_size, seq_length=self.seq_length)

    @property
    def decoupled_lr_range(self):
        """(final, peak) LR of the embedding and output layer weights with --decoupled-lr."""
        return (self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr), self.decoupled_lr

    @property
    def params_dtype(self) -> str:
        return "bfloat16" if self.bf16 else ("float16" if self.fp16 else "float32")


def _check_schedule_units(t: "TrainingConfig") -> None:
    """Megatron-LM's rules: the LR lengths count what the run counts (iterations, or samples with
    --train-samples, which then sets train_iters), and one kind of warmup. DeepSpeed's tokens
    stand beside either."""
    if t.train_iters is None and t.train_samples is None and t.train_tokens is None:
        raise ValueError("give the run's length: --train-iters N or --train-samples N (or --train-tokens N)")
    if t.train_samples is not None:
        wrong = {"--lr-decay-iters": t.lr_decay_iters, "--lr-warmup-iters": t.lr_warmup_iters or None}
        unit, use = "samples (--train-samples)", {"--lr-decay-iters": "--lr-decay-samples",
                                                 "--lr-warmup-iters": "--lr-warmup-samples"}
    else:
        wrong = {"--lr-decay-samples": t.lr_decay_samples, "--lr-warmup-samples": t.lr_warmup_samples or None}
        unit, use = "iterations (--train-iters)", {"--lr-decay-samples": "--lr-decay-iters",
                                                  "--lr-warmup-samples": "--lr-warmup-iters"}
    for flag, value in wrong.items():
        if value is not None:
            raise ValueError(f"{flag} {value}: this run counts {unit}; use {use[flag]} (as Megatron-LM)")
    warmups = [flag for flag, used in (("--lr-warmup-iters", bool(t.lr_warmup_iters)),
                                       ("--lr-warmup-samples", bool(t.lr_warmup_samples)),
                                       ("--lr-warmup-fraction", t.lr_warmup_fraction is not None),
                                       ("--lr-warmup-tokens", t.lr_warmup_tokens is not None)) if used]
    if len(warmups) > 1:
        raise ValueError(f"give one warmup length, not {' and '.join(warmups)}")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """A run's length and LR schedule in the scheduler's steps: iterations with a constant global
    batch (warmup and decay may be fractional: Megatron-LM counts them in samples, stepping by the
    global batch, which is the same schedule), samples with a batch ramp-up (the scheduler steps by
    each iteration's batch, as Megatron-LM's)."""

    train_iters: int
    warmup_steps: float
    decay_steps: float
    unit: str = "iterations"  # or "samples"
    total_steps: float = 0.0  # the whole run in the unit (megatron-core's wd_incr_steps)

    def increment(self, global_batch_size: int) -> int:
        """The scheduler's step after an iteration of ``global_batch_size`` sequences."""
        return global_batch_size if self.unit == "samples" else 1


def lr_schedule(t: TrainingConfig, global_batch_size: int) -> LRSchedule:
    """Megatron-LM's lengths (``get_optimizer_param_scheduler``, ``update_train_iters``) with a
    constant global batch: iterations = train_samples // global batch; decay = lr_decay_samples
    (default train_samples); warmup = lr_warmup_fraction x decay, else lr_warmup_samples; the
    iteration-based forms alike. DeepSpeed's tokens are samples x seq_length: --lr-warmup-tokens
    and --lr-decay-tokens replace the warmup and the decay, and --train-tokens ends the run at the
    first iteration that reaches it (if before the iterations or samples)."""
    if t.batch_schedule is not None:
        return _lr_schedule_in_samples(t, t.batch_schedule)
    tokens_per_iter = global_batch_size * t.seq_length
    if t.train_samples is not None:
        iters = t.train_samples // global_batch_size
        decay = (t.lr_decay_samples if t.lr_decay_samples is not None else t.train_samples) / global_batch_size
        warmup = t.lr_warmup_samples / global_batch_size
    else:
        iters = t.train_iters
        decay = float(t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters or 0)
        warmup = float(t.lr_warmup_iters)
    if t.train_tokens is not None:
        by_tokens = -(-t.train_tokens // tokens_per_iter)
        iters = by_tokens if iters is None else min(iters, by_tokens)
        if t.train_samples is None and t.train_iters is None and t.lr_decay_tokens is None:
            decay = float(iters)
    if t.lr_decay_tokens is not None:
        decay = t.lr_decay_tokens / tokens_per_iter
    if t.lr_warmup_fraction is not None:
        warmup = t.lr_warmup_fraction * decay
    elif t.lr_warmup_tokens is not None:
        warmup = t.lr_warmup_tokens / tokens_per_iter
    return _checked(t, LRSchedule(train_iters=iters, warmup_steps=warmup, decay_steps=decay, total_steps=iters),
                    f"iterations of {global_batch_size} sequences", global_batch_size)


def _lr_schedule_in_samples(t: TrainingConfig, batches: BatchSchedule) -> LRSchedule:
    """Megatron-LM's get_optimizer_param_scheduler with a batch ramp-up: the scheduler counts
    samples; sample lengths as given, iteration lengths x the final global batch, tokens / seq."""
    final = batches.final
    if t.train_samples is not None:
        iters, total = batches.iterations_for_samples(t.train_samples), t.train_samples
        decay = t.lr_decay_samples if t.lr_decay_samples is not None else t.train_samples
        warmup = float(t.lr_warmup_samples)
    else:
        iters = t.train_iters
        total = decay = (t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters or 0) * final
        warmup = float(t.lr_warmup_iters * final)
    if t.train_tokens is not None:
        by_tokens = batches.iterations_to_reach(-(-t.train_tokens // t.seq_length))
        iters = by_tokens if iters is None else min(iters, by_tokens)
        if t.train_samples is None and t.train_iters is None and t.lr_decay_tokens is None:
            total = decay = batches.samples_in(iters)
    if t.lr_decay_tokens is not None:
        decay = t.lr_decay_tokens / t.seq_length
    if t.lr_warmup_fraction is not None:
        warmup = t.lr_warmup_fraction * decay
    elif t.lr_warmup_tokens is not None:
        warmup = t.lr_warmup_tokens / t.seq_length
    return _checked(t, LRSchedule(train_iters=iters, warmup_steps=warmup, decay_steps=decay, unit="samples",
                                  total_steps=total or decay), "samples", final)


def _checked(t: TrainingConfig, schedule: LRSchedule, unit: str, global_batch_size: int) -> LRSchedule:
    """``schedule``, refused when the run has no iteration or the warmup does not end before the decay."""
    if schedule.train_iters < 1:
        given = (f"--train-samples {t.train_samples}" if t.train_samples is not None
                 else f"--train-tokens {t.train_tokens}")
        raise ValueError(f"{given} is less than one global batch ({global_batch_size} sequences of "
                         f"{t.seq_length} tokens): give more, or a smaller --global-batch-size")
    warmup, decay = schedule.warmup_steps, schedule.decay_steps
    if not decay > 0:
        raise ValueError("the LR decay is shorter than one sample: give a longer --lr-decay-samples/"
                         "--lr-decay-tokens/--lr-decay-iters")
    if warmup and warmup >= decay:
        raise ValueError(f"the LR warmup ({warmup:g} {unit}) must be shorter than the decay ({decay:g} {unit}): "
                         f"shorten --lr-warmup-* or lengthen --lr-decay-* (the decay defaults to the whole run)")
    return schedule


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Megatron-LM's tokenizer flags (files are checked by megatron.training.tokenizer)."""

    tokenizer_type: Optional[str] = None  # NullTokenizer with mock data and vocab_size
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    mock_data: bool = False
    data_path: Optional[Tuple[str, ...]] = None  # PREFIX ... or WEIGHT PREFIX ...
    split: str = "969,30,1"
    data_cache_path: Optional[str] = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False

    def __post_init__(self):
        if self.data_path is not None:
            _set(self, data_path=tuple(self.data_path))
        if not self.mock_data and not self.data_path:
            raise ValueError("give --data-path PREFIX [PREFIX ...] or --mock-data")
        parts = self.split.replace("/", ",").split(",")
        if not all(_is_number(p) and float(p) >= 0 for p in parts) or len(parts) > 3 or \
                not sum(float(p) for p in parts if _is_number(p)) > 0:
            raise ValueError(f"--split {self.split}: give up to three non-negative weights for train, validation "
                             f"and test, not all zero (e.g. 969,30,1)")
        paths = self.data_path or ()
        if len(paths) > 1 and len(paths) % 2 == 0 and _is_number(paths[0]):
            weights = paths[::2]
            if not all(_is_number(w) and float(w) >= 0 for w in weights) or not sum(map(float, weights)) > 0:
                raise ValueError(f"--data-path {' '.join(paths)}: the blend weights must be non-negative numbers, "
                                 f"not all zero")

    @property
    def prefixes(self) -> Tuple[str, ...]:
        """The dataset prefixes of ``data_path`` (without the weights of a blend)."""
        paths = self.data_path or ()
        weighted = len(paths) % 2 == 0 and all(_is_number(p) for p in paths[::2])
        return paths[1::2] if weighted else paths


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Saving, where a run starts (a resume, or a new stage: docs/STAGES.md), and the exits that save first."""

    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    finetune: bool = False  # --load's weights only: iteration 0, fresh optimizer, schedule, data and RNG
    no_load_optim: bool = False  # neither the optimizer state nor the LR schedule (Megatron-LM's)
    no_load_rng: bool = False  # RNG streams re-seeded from --seed and the iteration
    keep_last: Optional[int] = None
    exit_signal_handler: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None

    def __post_init__(self):
        _positive(save_interval=self.save_interval, keep_last=self.keep_last, exit_interval=self.exit_interval)
        _in_range("exit_duration_in_mins", self.exit_duration_in_mins, 0, low_open=True)
        if self.save_interval is not None and not self.save:
            raise ValueError("--save-interval needs --save DIR")
        for name in ("finetune", "no_load_optim", "no_load_rng"):
            if getattr(self, name) and not self.load:
                raise ValueError(f"--{name.replace('_', '-')} needs --load DIR (the checkpoint to start from)")
        if self.finetune and self.save and os.path.realpath(self.save) == os.path.realpath(self.load):
            raise ValueError(f"--finetune starts again at iteration 0: its checkpoints would sit among those of "
                             f"--load {self.load}, whose newer iterations a resume would take; give the new stage "
                             f"its own --save directory")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run is; ``fpdt`` is None for the baseline (megatron-core's standard spec)."""

    model: ModelConfig
    training: TrainingConfig
    data: DataConfig
    parallel: ParallelConfig = ParallelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    fpdt: Optional[FPDTConfig] = None

    def __post_init__(self):
        model, training, parallel = self.model, self.training, self.parallel
        if model.max_position_embeddings is None:
            _set(self, model=dataclasses.replace(model, max_position_embeddings=training.seq_length))
            model = self.model
        if model.max_position_embeddings < training.seq_length:
            raise ValueError(f"--max-position-embeddings {model.max_position_embeddings} is shorter than "
                             f"--seq-length {training.seq_length}")
        sp = self.fpdt.fpdt_parallel_size if self.fpdt else 1
        if sp != parallel.fpdt_parallel_size:
            raise ValueError(f"the FPDT config's size {sp} is not the parallel config's "
                             f"fpdt_parallel_size {parallel.fpdt_parallel_size}")
        check_heads(model.num_attention_heads, model.num_query_groups, sp_size=sp,
                    tp_size=parallel.tensor_model_parallel_size)
        if self.fpdt is not None:
            if model.attention_dropout:
                raise ValueError(f"FPDT attention has no dropout: add --attention-dropout 0 "
                                 f"(got {model.attention_dropout})")
            if parallel.sequence_parallel:
                raise ValueError("--sequence-parallel (Megatron-SP) cannot be combined with --fpdt yet; drop it "
                                 "(FPDT already splits the sequence)")
            if training.recompute_granularity == "selective":
                raise ValueError("--recompute-granularity selective (megatron-core's core-attention recompute) "
                                 "does not apply to FPDT layers, whose attention keeps no [s, s] scores and "
                                 "whose MLP already recomputes chunk by chunk: use --recompute-granularity full "
                                 "(the FPDT paper's recipe) or drop it")
            self.fpdt.num_chunks(training.seq_length)  # the sequence splits into P x u sub-chunks
            # derived: Megatron-FSDP's hooks for sharded gradients take one gradient per backward
            once = parallel.use_megatron_fsdp and parallel.data_parallel_sharding_strategy != "optim"
            if once != self.fpdt.param_grads_once:
                _set(self, fpdt=dataclasses.replace(self.fpdt, param_grads_once=once))
            if (self.fpdt.offload_dir or None) != (training.offload_dir if self.fpdt.fpdt_offload else None):
                raise ValueError("the FPDT config's offload_dir must be the training config's (--offload-dir)")
        shards = parallel.data_parallel_size * parallel.fpdt_parallel_size
        if (parallel.use_torch_fsdp2 and model.swiglu and parallel.tensor_model_parallel_size > 1 and shards > 1
                and shards % 2):
            raise ValueError(f"--use-torch-fsdp2 with --swiglu and tensor parallelism needs an even number of data x "
                             f"FPDT ranks to shard over, not {shards} (a shard would hold rows of both the gate and "
                             f"the up projection of its TP rank): change the data-parallel or FPDT size")
        if (parallel.use_torch_fsdp2 or parallel.use_megatron_fsdp) and training.fp16:
            flag = "--use-torch-fsdp2" if parallel.use_torch_fsdp2 else "--use-megatron-fsdp"
            raise ValueError(f"{flag} with --fp16 is not supported (the sharded optimizer has no loss "
                             f"scaler): use --bf16")
        micro_dp = training.micro_batch_size * parallel.data_parallel_size
        batches = training.batch_schedule
        # a resumed run checks the batches from its checkpoint's position on (Trainer: it may have
        # more data-parallel ranks than the ramp-up's first batches split over)
        problem = batches.indivisible(micro_dp) if batches is not None and not self.checkpoint.load else None
        if problem:
            raise ValueError(problem)
        if training.global_batch_size is None:
            _set(self, training=dataclasses.replace(training, global_batch_size=micro_dp))
        elif training.global_batch_size % micro_dp:
            raise ValueError(
                f"--global-batch-size {training.global_batch_size} is not divisible by --micro-batch-size "
                f"{training.micro_batch_size} x data-parallel size {parallel.data_parallel_size}; use a multiple "
                f"of {micro_dp}")
        training = self.training
        if parallel.pipeline_model_parallel_size > 1:
            parallel.stage_layers(model.num_layers)  # raises with what to change
            smallest = min(self.num_microbatches_of(b) for _, b in (batches.batches() if batches is not None else
                                                                     [(0, training.global_batch_size)]))
            if parallel.model_chunks > 1 and smallest < parallel.pipeline_model_parallel_size:
                raise ValueError(
                    f"the interleaved pipeline schedule needs at least --pipeline-model-parallel-size "
                    f"({parallel.pipeline_model_parallel_size}) micro batches per iteration, and this run has "
                    f"{smallest}: raise --global-batch-size (or lower --micro-batch-size), or drop the virtual "
                    f"stages")
        schedule = training.lr_schedule(training.global_batch_size)
        if schedule.train_iters != training.train_iters:
            _set(self, training=dataclasses.replace(training, train_iters=schedule.train_iters))
        if training.offload_dir is not None and not (training.offload_recompute_inputs or
                                                     (self.fpdt is not None and self.fpdt.fpdt_offload)):
            raise ValueError("--offload-dir has nothing to hold: add --fpdt-offload (attention chunks) and/or "
                             "--offload-recompute-inputs (checkpointed layer inputs)")
        if self.data.reset_position_ids and model.rotary:
            raise ValueError(f"--reset-position-ids with --position-embedding-type {model.position_embedding_type} "
                             f"is not supported: megatron-core's GPTModel (the baseline) applies RoPE at 0..S-1 "
                             f"whatever the position ids; use it with learned_absolute positions")

    @functools.cached_property
    def lr_schedule(self) -> LRSchedule:
        """The LR schedule in the scheduler's steps (what megatron-core's OptimizerParamScheduler steps
        through); made once (with a ramp-up it counts the run's iterations), read every iteration."""
        return self.training.lr_schedule(self.training.global_batch_size)

    @property
    def num_microbatches(self) -> int:
        """Micro batches per step of the (final) global batch."""
        return self.num_microbatches_of(self.training.global_batch_size)

    def num_microbatches_of(self, global_batch_size: int) -> int:
        return global_batch_size // (self.training.micro_batch_size * self.parallel.data_parallel_size)

    def global_batch_at(self, consumed_samples: int) -> int:
        """The global batch of the iteration after ``consumed_samples`` samples (a ramp-up's, or constant)."""
        batches = self.training.batch_schedule
        return batches.at(consumed_samples) if batches is not None else self.training.global_batch_size

    @property
    def train_samples_total(self) -> int:
        """Samples the whole run reads."""
        batches = self.training.batch_schedule
        t = self.training
        return batches.samples_in(t.train_iters) if batches is not None else t.train_iters * t.global_batch_size

    @property
    def fpdt_num_chunks(self) -> Optional[int]:
        """Chunks u of a sequence (None for the baseline)."""
        return self.fpdt.num_chunks(self.training.seq_length) if self.fpdt else None

    @property
    def params_dtype(self) -> str:
        return self.training.params_dtype
