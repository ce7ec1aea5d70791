"""The FPDT layer spec: megatron-core's local GPT layer with FPDT core attention and MLP.

Only modules without parameters of their own are swapped (core attention) or
subclassed (the MLP keeps ``linear_fc1``/``linear_fc2``), so a model built with
this spec has exactly the parameter names and shapes of megatron-core's
GPTModel with its local spec, and every Megatron checkpoint tool keeps working.

Self-attention is :class:`FPDTSelfAttention`, megatron-core's SelfAttention
with the same submodules (``linear_qkv`` column-parallel over TP, ``linear_proj``
row-parallel), whose forward runs the QKV projection and the rotary embedding
(at the tokens' true global positions, which the model passes) chunk by chunk
inside FPDT's loop (:func:`fpdt_ext.qkv.fpdt_qkv_attention`); FPDTGPTModel also
hands it the layer's input norm (:meth:`FPDTSelfAttention.fuse_input_norm`), so the
norm runs per chunk there and its whole-sequence output never exists (its
parameters stay ``input_layernorm.*``). Configurations
that loop does not cover (q/k layernorm, gated attention output, tensor
parallelism wider than the KV heads, multi-latent attention, selective
core-attention recompute, fine-grained activation offload, megatron's fused
QKV-rotary) run megatron-core's own forward, with whole-sequence q/k/v, into
:class:`FPDTCoreAttention`. Heads are split over TP first, then over the FPDT group.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttention, _yarn_get_concentration_factor_from_config
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from fpdt_ext.attention import fpdt_attention
from fpdt_ext.config import FPDTConfig
from fpdt_ext.mlp import FPDTMLP
from fpdt_ext.norm import FPDTNorm, fuse_into_next
from fpdt_ext.qkv import QKVLayout, fpdt_qkv_attention


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
                             offload=self.fpdt_config.fpdt_offload, offload_dir=self.fpdt_config.offload_dir,
                             softmax_scale=self.softmax_scale)
        return out.flatten(2)  # [s/P, b, heads/tp * d]


class FPDTSelfAttention(SelfAttention):
    """megatron-core's SelfAttention with the QKV projection and rotary inside FPDT's chunk loop.

    Same parameters and submodules as SelfAttention; see the module docstring for
    the configurations that fall back to SelfAttention's own forward.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.whole_sequence_reason = next((why for why, applies in (
            ("q/k layernorm", not all(n is None or isinstance(n, IdentityOp) for n in (self.q_layernorm,
                                                                                    self.k_layernorm))),
            ("attention output gate", getattr(cfg, "attention_output_gate", False)),
            ("fused QKV rotary", getattr(cfg, "fused_single_qkv_rope", False)),
            ("multi-latent attention", getattr(cfg, "multi_latent_attention", False)),
            ("tensor parallelism wider than the KV heads", cfg.num_query_groups < self.world_size),
            ("selective core-attention recompute", self.checkpoint_core_attention),
            ("fine-grained activation offload", getattr(cfg, "fine_grained_activation_offloading", False)),
            ("test mode", getattr(cfg, "test_mode", False)),
            ("core attention is not FPDT's", not isinstance(self.core_attention, FPDTCoreAttention)),
        ) if applies), None)
        self.qkv_layout = QKVLayout(self.num_attention_heads_per_partition, self.num_query_groups_per_partition,
                                    self.hidden_size_per_attention_head)
        self.rotary = functools.partial(apply_rotary_pos_emb, config=cfg,
                                        mscale=_yarn_get_concentration_factor_from_config(cfg),
                                        cp_group=self.pg_collection.cp)
        self._input_norm = ()  # (norm,) once fused; a tuple, so it is not registered a second time

    def fuse_input_norm(self, norm) -> bool:
        """Run ``norm`` (this layer's ``input_layernorm``, a chunked torch norm) chunk by chunk
        inside the QKV loop; the norm module then passes its input through. Returns whether
        it was fused (not with the whole-sequence fallback, nor for other norm classes)."""
        if self.whole_sequence_reason or not fuse_into_next(norm, self.config):
            return False
        self._input_norm = (norm,)
        return True

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, **kwargs):
        freqs = rotary_pos_emb
        if isinstance(freqs, tuple):  # (query, key) frequencies; self-attention passes one table twice
            freqs = freqs[0] if freqs[0] is freqs[1] else False
        unusual = (attention_mask is not None or key_value_states is not None or inference_context is not None
                   or freqs is False or any(a is not None for a in args) or any(v is not None for v in kwargs.values()))
        if self.whole_sequence_reason or unusual:  # megatron-core's forward (FPDTCoreAttention checks the rest)
            if self._input_norm:
                hidden_states = self._input_norm[0].normalize(hidden_states)
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, **kwargs)
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            freqs = None
        core = self.core_attention
        x = hidden_states
        if self.world_size > 1:  # identity forward, all-reduce of x's gradient over TP
            x = copy_to_tensor_model_parallel_region(x, group=self.pg_collection.tp)
        seq = x.shape[0] * core.fpdt_config.fpdt_parallel_size
        norm = self._input_norm[0].as_input_norm() if self._input_norm else None
        out = fpdt_qkv_attention(
            x, self.linear_qkv.weight, self.linear_qkv.bias, self.qkv_layout, norm=norm,
            rotary_freqs=freqs, rotary=None if freqs is None else self.rotary, sp_group=core.sp_group,
            tp_group=self.pg_collection.tp,
            overwrite_output_grad=True,  # its gradient comes fresh from linear_proj's backward, to this only
            num_chunks=core.fpdt_config.num_chunks(seq), offload=core.fpdt_config.fpdt_offload,
            offload_dir=core.fpdt_config.offload_dir, softmax_scale=core.softmax_scale)
        return self.linear_proj(out)


def get_fpdt_layer_spec(fpdt_config: FPDTConfig, *, tp_group, normalization: Optional[str] = None,
                        qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's local GPT layer spec with FPDT core attention and the chunked MLP.

    ``tp_group`` goes to the MLP explicitly (megatron-core only passes it to its own MLP class).
    """
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    spec.submodules.self_attention.module = FPDTSelfAttention
    for name in ("input_layernorm", "pre_mlp_layernorm"):  # torch's norms: chunked (apex's stay as they are)
        if getattr(spec.submodules, name) is WrappedTorchNorm:
            setattr(spec.submodules, name, ModuleSpec(module=FPDTNorm, params={"fpdt_config": fpdt_config}))
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = ModuleSpec(module=FPDTCoreAttention, params={"fpdt_config": fpdt_config})
    mlp = spec.submodules.mlp
    spec.submodules.mlp = ModuleSpec(module=FPDTMLP, submodules=mlp.submodules,
                                     params={**(mlp.params or {}), "fpdt_config": fpdt_config,
                                                             "tp_group": tp_group})
    return spec
