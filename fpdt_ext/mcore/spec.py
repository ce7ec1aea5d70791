"""The FPDT layer spec: what each layer of an FPDT model computes, in one place.

Every module keeps the parameter names and shapes of megatron-core's local GPT layer spec
(and its checkpoint key map), so a model built with this spec loads and saves the same
checkpoints as megatron-core's GPTModel, and every Megatron checkpoint tool keeps working:

    FPDTTransformerLayer                 (mcore/layer.py) hands each norm to the module it feeds
      input_layernorm    Chunked{LayerNorm,RMSNorm}   (mcore/norm.py)  run inside the QKV loop
      self_attention     FPDTSelfAttention            (mcore/attention.py)
        linear_qkv         ColumnParallelLinear       projected chunk by chunk (core/qkv.py)
        core_attention     FPDTCoreAttention          only for q/k layernorm or TP > KV heads
        linear_proj        RowParallelLinear
        q/k_layernorm      TorchNorm with --qk-layernorm, else IdentityOp     (mcore/norm.py)
      self_attn_bda      megatron-core's bias-dropout-add
      pre_mlp_layernorm  Chunked{LayerNorm,RMSNorm}   run inside the MLP's chunks
      mlp                FPDTMLP                      (mcore/mlp.py) chunked, recomputed in backward
        linear_fc1, linear_fc2  ColumnParallelLinear, RowParallelLinear
      mlp_bda            megatron-core's bias-dropout-add

All FPDT modules take the same frozen :class:`~fpdt_ext.core.config.FPDTConfig`, and the
attention modules the model's :class:`~fpdt_ext.memory.offload.MemoryTiers`; process groups
come from megatron-core's ``pg_collection`` (the FPDT group is its context-parallel group).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.mcore.attention import FPDTCoreAttention, FPDTSelfAttention
from fpdt_ext.mcore.layer import FPDTTransformerLayer
from fpdt_ext.mcore.mlp import FPDTMLP
from fpdt_ext.mcore.norm import TorchNorm, chunked_norm_class
from fpdt_ext.memory.offload import MemoryTiers


def get_fpdt_layer_spec(fpdt_config: FPDTConfig, *, tiers: MemoryTiers, tp_group,
                        normalization: Optional[str] = None, qk_layernorm: bool = False) -> ModuleSpec:
    """The FPDT layer for ``--normalization`` (LayerNorm or RMSNorm). ``tiers``: where the model's
    offloaded chunks go (one per model, shared by its layers). ``tp_group`` goes to the MLP
    explicitly (megatron-core passes it only to its own MLP class)."""
    attention_params = {"fpdt_config": fpdt_config, "tiers": tiers}
    norm = ModuleSpec(module=chunked_norm_class(normalization or "LayerNorm"), params={"fpdt_config": fpdt_config})
    qk_norm = TorchNorm if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=FPDTTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=FPDTSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal, **attention_params},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(module=FPDTCoreAttention, params=attention_params),
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=FPDTMLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                params={"fpdt_config": fpdt_config, "tp_group": tp_group},
            ),
            mlp_bda=get_bias_dropout_add,
            # megatron-core's local spec stores the norms under TE's names: the same checkpoints
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )
