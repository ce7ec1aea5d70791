"""FPDTTransformerLayer: megatron-core's TransformerLayer whose norms run inside the chunk loops.

Same submodules, parameters, residuals and bias-dropout-adds as megatron-core's
TransformerLayer (it is a subclass; the spec chooses it). Its forward is the layer's
arithmetic written out, with one difference: a norm is not applied to the whole sequence
before the module it feeds. The layer hands its ``input_layernorm`` to the self-attention
and its ``pre_mlp_layernorm`` to the MLP at forward time, and those normalise each chunk
inside their own loops (the QKV projection's, the MLP's), so no whole-sequence norm output
exists::

    h   = x + dropout(self_attention(x, input_norm=input_layernorm))      # [s/P, b, h]
    out = h + dropout(mlp(h, input_norm=pre_mlp_layernorm))

Nothing is changed on the norms or the modules after construction: who normalises is decided
in this forward, on every call.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class FPDTTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, *args, **kwargs):
        unsupported = [name for name, on in (
            ("selective recompute", config.recompute_granularity == "selective"),
            ("CUDA graphs", bool(getattr(config, "cuda_graph_impl", "none") not in (None, "none"))),
            ("fine-grained activation offloading", getattr(config, "fine_grained_activation_offloading", False)),
            ("mixture of experts", bool(config.num_moe_experts)),
        ) if on]
        if unsupported:
            raise ValueError(f"the FPDT layer does not support {', '.join(unsupported)}")
        super().__init__(config, submodules, *args, **kwargs)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                attention_bias=None, inference_context=None, packed_seq_params=None, padding_mask=None, **kwargs):
        extra = {k: v for k, v in dict(kwargs, context=context, context_mask=context_mask,
                                       attention_bias=attention_bias, inference_context=inference_context,
                                       packed_seq_params=packed_seq_params).items() if v is not None}
        if extra:
            raise ValueError(f"the FPDT layer is causal self-attention over whole sequences; it takes no "
                             f"{sorted(extra)}")
        residual = hidden_states  # [s/P, b, h]
        attention = self.self_attention(hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                        input_norm=self.input_layernorm)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention, residual, self.hidden_dropout)
        residual = hidden_states
        mlp = self.mlp(hidden_states, input_norm=self.pre_mlp_layernorm)
        with self.bias_dropout_add_exec_handler():
            output = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(mlp, residual, self.hidden_dropout)
        # a jit-fused bias-dropout-add returns a view, which megatron-core's checkpoint refuses to save
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True), None
