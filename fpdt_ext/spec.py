"""The FPDT layer spec: megatron-core's local GPT layer with FPDT core attention and MLP.

Only modules without parameters of their own are swapped (core attention) or
subclassed (the MLP keeps ``linear_fc1``/``linear_fc2``), so a model built with
this spec has exactly the parameter names and shapes of megatron-core's
GPTModel with its local spec, and every Megatron checkpoint tool keeps working.

megatron-core's SelfAttention still does the QKV projection (``linear_qkv``,
column-parallel over TP), applies the rotary embedding it is given (the model
passes frequencies at the tokens' true global positions) and the output
projection (``linear_proj``, row-parallel); heads are split over TP first, then
over the FPDT group inside :func:`fpdt_attention`.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from fpdt_ext.attention import fpdt_attention
from fpdt_ext.config import FPDTConfig
from fpdt_ext.mlp import FPDTMLP


class FPDTCoreAttention(MegatronModule):
    """Core attention for megatron-core's SelfAttention: q/k/v [s/P, b, heads/tp, d] -> [s/P, b, h/tp]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, fpdt_config: FPDTConfig):
        super().__init__(config=config)
        if attention_type != "self" or attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"FPDT attention is causal self-attention; got {attention_type} "
                             f"attention with mask type {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"FPDT attention has no attention dropout; set --attention-dropout 0 (got {dropout})")
        if pg_collection is None:
            raise ValueError("FPDTCoreAttention needs the process groups (pg_collection) it runs on")
        self.sp_group = pg_collection.cp  # the FPDT group occupies megatron-core's context-parallel axis
        self.fpdt_config = fpdt_config
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("FPDT attention is causal by construction: pass attention_mask=None and no "
                             "attention bias or packed sequences")
        seq = query.shape[0] * self.fpdt_config.fpdt_parallel_size
        out = fpdt_attention(query, key, value, sp_group=self.sp_group,
                             num_chunks=self.fpdt_config.num_chunks(seq),
                             offload=self.fpdt_config.fpdt_offload, softmax_scale=self.softmax_scale)
        return out.flatten(2)  # [s/P, b, heads/tp * d]


def get_fpdt_layer_spec(fpdt_config: FPDTConfig, *, tp_group, normalization: Optional[str] = None,
                        qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's local GPT layer spec with FPDT core attention and the chunked MLP.

    ``tp_group`` goes to the MLP explicitly (megatron-core only passes it to its own MLP class).
    """
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = ModuleSpec(module=FPDTCoreAttention, params={"fpdt_config": fpdt_config})
    mlp = spec.submodules.mlp
    spec.submodules.mlp = ModuleSpec(module=FPDTMLP, submodules=mlp.submodules,
                                     params={**(mlp.params or {}), "fpdt_config": fpdt_config,
                                                             "tp_group": tp_group})
    return spec
