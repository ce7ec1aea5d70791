"""FPDT's self-attention for megatron-core layers.

:class:`FPDTSelfAttention` is megatron-core's SelfAttention (same ``linear_qkv``,
column-parallel over TP, and ``linear_proj``, row-parallel; same parameters) whose forward
runs the layer's input norm, the QKV projection and the rotary embedding (at the tokens'
true global positions, which the model passes) chunk by chunk inside FPDT's loop
(:func:`fpdt_ext.core.qkv.fpdt_qkv_attention`): no whole-sequence norm output, q, k, v or
``[s/P, b, 3h]`` projection exists. Two configurations run megatron-core's own forward
(whole-sequence q/k/v) into :class:`FPDTCoreAttention` instead, both chosen at construction:
q/k layernorm (it normalises whole heads of q and k between projection and rotary), and
tensor parallelism wider than the KV heads (megatron-core replicates KV heads over TP
inside its forward). Heads split over TP first, then over the FPDT group.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttention, _yarn_get_concentration_factor_from_config
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule

from fpdt_ext.core.attention import fpdt_attention
from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.core.qkv import QKVLayout, fpdt_qkv_attention
from fpdt_ext.memory.offload import MemoryTiers
from fpdt_ext.mcore.norm import ChunkedNorm


def _softmax_scale(config, softmax_scale: Optional[float] = None) -> float:
    return softmax_scale or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)


def _check_supported(config) -> None:
    unsupported = [name for name, on in (
        ("an attention output gate", getattr(config, "attention_output_gate", False)),
        ("megatron's fused QKV rotary", getattr(config, "fused_single_qkv_rope", False)),
        ("multi-latent attention", getattr(config, "multi_latent_attention", False)),
        ("selective core-attention recompute", "core_attn" in (config.recompute_modules or ())
         and config.recompute_granularity == "selective"),
        ("fine-grained activation offloading", getattr(config, "fine_grained_activation_offloading", False)),
    ) if on]
    if unsupported:
        raise ValueError(f"FPDT attention does not support {', '.join(unsupported)}")


class FPDTCoreAttention(MegatronModule):
    """Core attention for megatron-core's SelfAttention forward: q/k/v [s/P, b, heads/tp, d] -> [s/P, b, h/tp]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, fpdt_config: FPDTConfig,
                 tiers: MemoryTiers):
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
        self.fpdt_config, self.tiers = fpdt_config, tiers
        self.softmax_scale = _softmax_scale(config, softmax_scale)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("FPDT attention is causal by construction: pass attention_mask=None and no "
                             "attention bias or packed sequences")
        plan = self.fpdt_config.plan(query.shape[0], sp_group=self.sp_group, tiers=self.tiers)
        out = fpdt_attention(query, key, value, plan=plan, softmax_scale=self.softmax_scale)
        return out.flatten(2)  # [s/P, b, heads/tp * d]


class FPDTSelfAttention(SelfAttention):
    """megatron-core's SelfAttention with the input norm, QKV projection and rotary inside FPDT's
    chunk loop (see the module docstring for the two configurations that are not)."""

    def __init__(self, config, submodules, *args, fpdt_config: FPDTConfig, tiers: MemoryTiers, **kwargs):
        _check_supported(config)
        super().__init__(config, submodules, *args, **kwargs)
        self.fpdt_config, self.tiers = fpdt_config, tiers
        self.sp_group = self.pg_collection.cp
        self.softmax_scale = _softmax_scale(config)
        qk_norm = not all(n is None or isinstance(n, IdentityOp) for n in (self.q_layernorm, self.k_layernorm))
        self.whole_sequence = qk_norm or config.num_query_groups < self.world_size
        self.qkv_layout = QKVLayout(self.num_attention_heads_per_partition, self.num_query_groups_per_partition,
                                    self.hidden_size_per_attention_head)
        self.rotary = functools.partial(apply_rotary_pos_emb, config=config,
                                        mscale=_yarn_get_concentration_factor_from_config(config),
                                        cp_group=self.sp_group)

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, input_norm=None, **kwargs):
        """``input_norm``: the layer's norm for ``hidden_states`` (None: already normalised)."""
        if self.whole_sequence:  # megatron-core's forward (FPDTCoreAttention checks the rest)
            if input_norm is not None:
                hidden_states = input_norm(hidden_states)
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, **kwargs)
        extra = [k for k, v in kwargs.items() if v is not None] + [i for i, a in enumerate(args) if a is not None]
        if attention_mask is not None or key_value_states is not None or inference_context is not None or extra:
            raise ValueError("FPDT self-attention is causal over whole sequences: it takes no attention mask, "
                             f"key/value states, inference context or {extra}")
        freqs = rotary_pos_emb
        if isinstance(freqs, tuple):  # (query, key) frequencies; self-attention passes one table twice
            if freqs[0] is not freqs[1]:
                raise ValueError("FPDT self-attention takes one rotary table for queries and keys")
            freqs = freqs[0]
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            freqs = None
        if input_norm is not None and not isinstance(input_norm, ChunkedNorm):
            hidden_states, input_norm = input_norm(hidden_states), None  # a norm the loop cannot run
        x = hidden_states
        if self.world_size > 1:  # identity forward, all-reduce of x's gradient over TP
            x = copy_to_tensor_model_parallel_region(x, group=self.pg_collection.tp)
        plan = self.fpdt_config.plan(x.shape[0], sp_group=self.sp_group, tiers=self.tiers)
        out = fpdt_qkv_attention(
            x, self.linear_qkv.weight, self.linear_qkv.bias, self.qkv_layout, plan,
            norm=None if input_norm is None else input_norm.input_norm(),
            rotary_freqs=freqs, rotary=None if freqs is None else self.rotary, tp_group=self.pg_collection.tp,
            overwrite_output_grad=True,  # its gradient comes fresh from linear_proj's backward, to this only
            softmax_scale=self.softmax_scale)
        return self.linear_proj(out)
