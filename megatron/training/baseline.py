"""The baseline every comparison uses: megatron-core's standard GPT layer spec.

On GPU with TransformerEngine installed it is megatron-core's TE spec. Otherwise
it is the local spec with one change: core attention through torch's
``scaled_dot_product_attention`` (flash/efficient kernels on GPU, the flash
kernel on CPU), because megatron-core's local ``DotProductAttention``
materialises the full ``[s, s]`` score matrix and would make the baseline look
worse than a user would see. Parameter names are those of the local spec.

With zero-centred gamma (``--apply-layernorm-1p``) the local spec's norms are
:class:`~fpdt_ext.mcore.norm.TorchNorm` (torch's norms scaled by ``1 + weight``): megatron-core's
``WrappedTorchNorm`` refuses it. TransformerEngine's norms take it from the config.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from fpdt_ext import runtime
from fpdt_ext.mcore.norm import TorchNorm


class SDPACoreAttention(MegatronModule):
    """Causal core attention via torch SDPA: q [s, b, np, hn], k/v [s, b, ng, hn] -> [s, b, np*hn]."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError("SDPACoreAttention is causal self-attention only")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention takes no attention bias or packed sequences")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():  # dropout differs across TP ranks, as Megatron
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).flatten(2)  # [s, b, np*hn]


def baseline_layer_spec(*, normalization=None, qk_layernorm=False, zero_centered_gamma=False) -> ModuleSpec:
    if runtime.current().cuda and importlib.util.find_spec("transformer_engine") is not None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = SDPACoreAttention
    if zero_centered_gamma:
        layer.input_layernorm = layer.pre_mlp_layernorm = TorchNorm
        if qk_layernorm:
            attention.q_layernorm = attention.k_layernorm = TorchNorm
    return spec
