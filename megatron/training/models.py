"""Build the GPT/Llama model of a run: the FPDT spec with FPDT, the baseline otherwise."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer import transformer_block
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from fpdt_ext import runtime
from fpdt_ext.mcore import cpu_shims
from fpdt_ext.mcore.model import FPDTGPTModel
from fpdt_ext.mcore.norm import TorchNorm
from fpdt_ext.mcore.spec import get_fpdt_layer_spec
from fpdt_ext.memory.offload import MemoryTiers
from megatron.training.baseline import baseline_layer_spec
from megatron.training.config import ModelConfig, RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's vocabulary padding: a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def openai_gelu(x):
    """GPT-2's GeLU (tanh approximation), Megatron's --openai-gelu."""
    return F.gelu(x, approximate="tanh")


def activation(model: ModelConfig):
    if model.swiglu:
        return F.silu
    return openai_gelu if model.openai_gelu else F.gelu


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_position_embeddings: int, beta_fast: float,
                  beta_slow: float, round_to_int: bool) -> torch.Tensor:
    """YaRN's RoPE frequencies [dim/2] (float32, on the CPU whatever the default device), as
    transformers' ``rope_type: yarn`` computes them (its ``truncate`` is ``round_to_int``): each
    blends the original frequency with the interpolated one (divided by ``factor``) along a ramp
    over the dimensions whose rotations over the original context fall from ``beta_fast`` to
    ``beta_slow``; faster ones keep the original, slower ones take the interpolated."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    original, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def dimension(rotations):  # the dimension that turns ``rotations`` times over the original context
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of (almost) zero width, not a division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: the interpolated one
    return interpolated * (1 - keep) + original * keep


class ScaledRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RotaryEmbedding with the frequencies of transformers' RoPE types: Llama 3.1's
    scaling at all its parameters (megatron-core's own fixes low_freq_factor 1, high_freq_factor 4
    and an original context of 8192 tokens; transformers' ``rope_type: llama3`` takes them from
    config.json), or YaRN's (:func:`yarn_inv_freq`, over the rotary part of the head as transformers'
    ``partial_rotary_factor``). YaRN's attention factor is not here: attention scales cos and sin by
    it, from the TransformerConfig (:class:`YarnTransformerConfig`).

    megatron-core's YarnRotaryEmbedding computes the same frequencies over the whole head, but
    rotates the whole head whatever --rotary-percent, returns (table, factor) where FPDT's model
    takes a table, and precomputes cos and sin over the original context, which nothing reads: a
    YaRN model is built as RoPE with these frequencies (:func:`build_model`)."""

    def __init__(self, model: ModelConfig, tcfg: TransformerConfig, cp_group=None):
        super().__init__(kv_channels=tcfg.kv_channels, rotary_percent=model.rotary_percent,
                         rotary_interleaved=tcfg.rotary_interleaved,
                         seq_len_interpolation_factor=model.rotary_seq_len_interpolation_factor,
                         rotary_base=model.rotary_base, rope_scaling=False,
                         use_cpu_initialization=tcfg.use_cpu_initialization, cp_group=cp_group)
        if model.use_rope_scaling:
            self.inv_freq = self._apply_scaling(
                self.inv_freq, factor=model.rope_scaling_factor, low_freq_factor=model.rope_scaling_low_freq_factor,
                high_freq_factor=model.rope_scaling_high_freq_factor,
                original_max_position_embeddings=model.rope_scaling_original_max_position_embeddings)
        if model.position_embedding_type == "yarn":
            dim = int(tcfg.kv_channels * model.rotary_percent) if model.rotary_percent < 1 else tcfg.kv_channels
            self.inv_freq = yarn_inv_freq(
                dim, model.rotary_base, model.rotary_scaling_factor, model.yarn_original_max_position_embeddings,
                model.yarn_beta_fast, model.yarn_beta_slow, model.yarn_correction_range_round_to_int,
            ).to(self.inv_freq.device)


@dataclasses.dataclass
class YarnTransformerConfig(TransformerConfig):
    """TransformerConfig with the YaRN fields megatron-core reads by name (``getattr(config,
    "yarn_...")``; Megatron-LM sets them on its config the same way). Attention, the baseline's and
    FPDT's alike, scales cos and sin by megatron-core's attention factor of yarn_rotary_scaling_factor,
    yarn_mscale and yarn_mscale_all_dim: (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim
    ln(factor) + 1), 1 for a factor <= 1. The frequencies come from :class:`ScaledRotaryEmbedding`."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True


def transformer_config(config: RunConfig) -> TransformerConfig:
    model, training, parallel = config.model, config.training, config.parallel
    cuda = runtime.current().cuda
    recompute = training.recompute_granularity == "full"
    # megatron-core's fused bias-dropout-add is torch.compile'd in every process on first use: it
    # pays only when there is a bias or dropout to fuse (not for Llama's bias-free, dropout-free layers)
    fuse_bias_dropout = cuda and (model.add_bias_linear or model.hidden_dropout > 0)
    yarn = {}
    if model.position_embedding_type == "yarn":
        yarn = dict(yarn_rotary_scaling_factor=model.rotary_scaling_factor,
                    yarn_original_max_position_embeddings=model.yarn_original_max_position_embeddings,
                    yarn_beta_fast=model.yarn_beta_fast, yarn_beta_slow=model.yarn_beta_slow,
                    yarn_mscale=model.mscale, yarn_mscale_all_dim=model.mscale_all_dim,
                    yarn_correction_range_round_to_int=model.yarn_correction_range_round_to_int)
    return (YarnTransformerConfig if yarn else TransformerConfig)(
        **yarn,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers,
        # what the stages send each other: activations in the training dtype
        pipeline_dtype=DTYPES[config.params_dtype] if parallel.pipeline_model_parallel_size > 1 else None,
        # the interleaved schedule's sends as Megatron-LM's defaults (--overlap-p2p-communication):
        # separate isend/irecv ordered by even and odd ranks. Batched, two stages' forward and
        # backward messages to one peer pair up in the wrong order (Megatron-LM refuses that with
        # PP 2); the 1F1B schedule keeps megatron-core's batched default
        overlap_p2p_comm=parallel.model_chunks > 1,
        batch_p2p_comm=parallel.model_chunks == 1,
        # as Megatron-LM: a stage's output is freed once sent (its backward needs only its graph);
        # not on the CPU with the interleaved schedule's overlapped sends, where gloo may still be
        # reading the tensor when megatron-core swaps its storage out (the next stage got wrong values)
        deallocate_pipeline_outputs=parallel.pipeline_model_parallel_size > 1 and (cuda or parallel.model_chunks == 1),
        sequence_parallel=parallel.sequence_parallel,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        layernorm_zero_centered_gamma=model.apply_layernorm_1p,
        gated_linear_unit=model.swiglu,
        activation_func=activation(model),
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        qk_layernorm=model.qk_layernorm,
        bf16=training.bf16,
        fp16=training.fp16,
        params_dtype=DTYPES[config.params_dtype],
        # The same full weights whatever the TP size (initialised on the CPU, then split).
        use_cpu_initialization=not cuda,
        # Fused kernels need CUDA.
        bias_activation_fusion=cuda and model.add_bias_linear and activation(model) is F.gelu,
        bias_dropout_fusion=fuse_bias_dropout,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        # selective: megatron-core's default module (core attention), for the baseline; FPDT layers refuse it
        recompute_granularity=training.recompute_granularity,
        recompute_method=training.recompute_method if recompute else None,
        recompute_num_layers=training.recompute_num_layers if recompute else None,
    )


def with_final_norm(layer_spec, tcfg: TransformerConfig):
    """The decoder's spec: the layer's, with megatron-core's final norm (TENorm or apex's, which take
    zero-centred gamma from the config), except that with --apply-layernorm-1p where megatron-core's
    would be WrappedTorchNorm (which refuses it), TorchNorm."""
    if not tcfg.layernorm_zero_centered_gamma or transformer_block.LayerNormImpl is not WrappedTorchNorm:
        return layer_spec
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * tcfg.num_layers, layer_norm=TorchNorm)


def build_model(config: RunConfig, groups, vocab_size: int, layer_spec=None, tiers: Optional[MemoryTiers] = None,
                padded_vocab: Optional[int] = None):
    """The model on this rank, for runs without a pipeline (:func:`build_model_chunks` otherwise)."""
    chunks = build_model_chunks(config, groups, vocab_size, layer_spec, tiers, padded_vocab)
    if len(chunks) != 1:
        raise ValueError("this tool runs the whole model in one process: use --pipeline-model-parallel-size 1 "
                         "(checkpoints load at any pipeline size)")
    return chunks[0]


def build_model_chunks(config: RunConfig, groups, vocab_size: int, layer_spec=None,
                       tiers: Optional[MemoryTiers] = None, padded_vocab: Optional[int] = None) -> list:
    """The model chunks on this rank, one per virtual pipeline stage (one without interleaving; the
    whole model without a pipeline): FPDTGPTModel with the FPDT spec (its offloaded chunks in
    ``tiers``, new ones by default), or GPTModel with the baseline spec (or with ``layer_spec``,
    e.g. megatron-core's local spec for reference runs). Each holds its stage's layers (megatron-
    core's split; the embedding on the first stage, the output layer and loss on the last). The
    vocabulary is padded as Megatron pads it for the run's TP size, or to ``padded_vocab`` (that of
    a checkpoint to load)."""
    n, stages = config.parallel.model_chunks, config.parallel.pipeline_model_parallel_size
    pp_rank = groups.pp_rank if stages > 1 else 0
    chunks = []
    # a pipeline's last stage syncs its copy of a tied embedding with the first through .cuda()
    on_cpu = stages > 1 and not runtime.current().on_gpu
    for vp_stage in range(n):
        with cpu_shims.cuda_tensors_on_cpu() if on_cpu else contextlib.nullcontext():
            chunks.append(_build_stage(config, groups, vocab_size, layer_spec, tiers, padded_vocab,
                                       pre_process=pp_rank == 0 and vp_stage == 0,
                                       post_process=pp_rank == stages - 1 and vp_stage == n - 1,
                                       vp_stage=vp_stage if n > 1 else None))
    return chunks


def _build_stage(config: RunConfig, groups, vocab_size: int, layer_spec, tiers, padded_vocab, *, pre_process: bool,
                 post_process: bool, vp_stage: Optional[int]):
    model = config.model
    tcfg = transformer_config(config)
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by,
                                         config.parallel.tensor_model_parallel_size)
    common = dict(
        config=tcfg,
        vocab_size=padded_vocab,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        # YaRN: RoPE with ScaledRotaryEmbedding's frequencies; attention applies its factor (YarnTransformerConfig)
        position_embedding_type="rope" if model.rotary else model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        rope_scaling=model.use_rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        seq_len_interpolation_factor=model.rotary_seq_len_interpolation_factor,
        pg_collection=groups.pg_collection,
    )
    if config.fpdt is not None:
        tiers = tiers or MemoryTiers(config.training.offload_dir)
        spec = get_fpdt_layer_spec(config.fpdt, tiers=tiers, tp_group=groups.tp, normalization=model.normalization,
                                   qk_layernorm=model.qk_layernorm)
        built = FPDTGPTModel(transformer_layer_spec=with_final_norm(spec, tcfg), fpdt_config=config.fpdt, **common)
    else:
        spec = layer_spec or baseline_layer_spec(normalization=model.normalization, qk_layernorm=model.qk_layernorm,
                                                 zero_centered_gamma=model.apply_layernorm_1p)
        built = GPTModel(transformer_layer_spec=with_final_norm(spec, tcfg), **common)
    if model.rotary:
        # GPTModel builds megatron-core's RotaryEmbedding, whose Llama 3.1 scaling has fixed
        # parameters and which has no YaRN: ours instead (it holds no parameters or state)
        built.rotary_pos_emb = ScaledRotaryEmbedding(model, tcfg, cp_group=groups.pg_collection.cp)
    if tcfg.params_dtype != torch.float32:
        # as Megatron's Float16Module: every parameter in the training dtype, including the
        # torch norms megatron-core creates in float32 (the optimizer keeps fp32 master weights)
        built.to(dtype=tcfg.params_dtype)
    rt = runtime.current()
    if rt.cuda:
        built.cuda(rt.device)
    return built
