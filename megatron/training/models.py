"""Build the GPT/Llama model from arguments: the FPDT spec with --fpdt, the baseline otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from fpdt_ext import runtime
from fpdt_ext.mcore.model import FPDTGPTModel
from fpdt_ext.mcore.spec import get_fpdt_layer_spec
from megatron.training.arguments import padded_vocab_size
from megatron.training.baseline import baseline_layer_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def openai_gelu(x):
    """GPT-2's GeLU (tanh approximation), Megatron's --openai-gelu."""
    return F.gelu(x, approximate="tanh")


def activation(args):
    if args.swiglu:
        return F.silu
    return openai_gelu if getattr(args, "openai_gelu", False) else F.gelu


def transformer_config(args) -> TransformerConfig:
    cuda = runtime.current().cuda
    recompute = args.recompute_granularity == "full"
    # megatron-core's fused bias-dropout-add is torch.compile'd in every process on first use: it
    # pays only when there is a bias or dropout to fuse (not for Llama's bias-free, dropout-free layers)
    fuse_bias_dropout = cuda and (args.add_bias_linear or args.hidden_dropout > 0)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=activation(args),
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        qk_layernorm=args.qk_layernorm,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=DTYPES[args.params_dtype],
        # The same full weights whatever the TP size (initialised on the CPU, then split).
        use_cpu_initialization=not cuda,
        # Fused kernels need CUDA.
        bias_activation_fusion=cuda and args.add_bias_linear and activation(args) is F.gelu,
        bias_dropout_fusion=fuse_bias_dropout,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        recompute_granularity="full" if recompute else None,
        recompute_method=args.recompute_method if recompute else None,
        recompute_num_layers=args.recompute_num_layers if recompute else None,
    )


def build_model(args, groups, vocab_size: int, layer_spec=None):
    """The model on this rank: FPDTGPTModel with the FPDT spec, or GPTModel with the baseline
    spec (or with ``layer_spec``, e.g. megatron-core's local spec for reference runs)."""
    config = transformer_config(args)
    common = dict(
        config=config,
        vocab_size=padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size),
        max_sequence_length=args.max_position_embeddings,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        pg_collection=groups.pg_collection,
    )
    if args.fpdt:
        spec = get_fpdt_layer_spec(args.fpdt_config, tp_group=groups.tp, normalization=args.normalization,
                                   qk_layernorm=args.qk_layernorm)
        model = FPDTGPTModel(transformer_layer_spec=spec, fpdt_config=args.fpdt_config, **common)
    else:
        spec = layer_spec or baseline_layer_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)
        model = GPTModel(transformer_layer_spec=spec, **common)
    if config.params_dtype != torch.float32:
        # as Megatron's Float16Module: every parameter in the training dtype, including the
        # torch norms megatron-core creates in float32 (the optimizer keeps fp32 master weights)
        model.to(dtype=config.params_dtype)
    rt = runtime.current()
    if rt.cuda:
        model.cuda(rt.device)
    return model
