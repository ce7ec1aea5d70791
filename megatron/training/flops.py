"""Model FLOPs of a training step, for TFLOP/s and MFU.

Counted per token, forward, in multiply-adds x 2, for a decoder with L layers,
hidden h, H query heads and KV key/value heads of size d, FFN size f and
vocabulary V at global sequence length S (causal):

    QKV projection       2 * h * (H + 2*KV) * d
    attention            2 * H * d * S          (QK^T and PV, each 2*H*d per key,
                                                 S/2 keys on average under the causal mask)
    output projection    2 * H * d * h
    MLP                  2 * h * f * (3 if gated (SwiGLU) else 2)
    logits               2 * h * V

    training FLOPs/token = 3 * (L * (QKV + attention + projection + MLP) + logits)

(backward = 2 x forward). Recomputation is not counted: MFU measures useful
model FLOPs, so recompute lowers it, as in the FPDT paper and Megatron-LM.
"""

from __future__ import annotations

# Dense peak TFLOP/s per device for bf16/fp16 (no sparsity), by name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def training_flops_per_token(*, num_layers, hidden_size, num_heads, num_kv_heads, head_dim, ffn_hidden_size,
                             vocab_size, seq_length, gated) -> float:
    qkv = 2 * hidden_size * (num_heads + 2 * num_kv_heads) * head_dim
    attention = 2 * num_heads * head_dim * seq_length
    projection = 2 * num_heads * head_dim * hidden_size
    mlp = 2 * hidden_size * ffn_hidden_size * (3 if gated else 2)
    logits = 2 * hidden_size * vocab_size
    return 3.0 * (num_layers * (qkv + attention + projection + mlp) + logits)


def parameter_count(*, num_layers, hidden_size, num_heads, num_kv_heads, head_dim, ffn_hidden_size, vocab_size,
                    gated, tied, bias=False, layernorm=False, learned_positions=0) -> int:
    """Parameters of a GPT/Llama decoder (all ranks together): the one count, shared by the
    training code and tools/memory_planner.py."""
    h, d, f = hidden_size, head_dim, ffn_hidden_size
    norm = 2 * h if layernorm else h
    attention = h * (num_heads + 2 * num_kv_heads) * d + num_heads * d * h + (
        (num_heads + 2 * num_kv_heads) * d + h if bias else 0)
    mlp = h * f * (2 if gated else 1) + f * h + (f * (2 if gated else 1) + h if bias else 0)
    layer = attention + mlp + 2 * norm
    embeddings = vocab_size * h * (1 if tied else 2) + learned_positions * h
    return num_layers * layer + norm + embeddings


def count_parameters(model, vocab_size: int) -> int:
    """Parameters of the model a :class:`~megatron.training.config.ModelConfig` describes."""
    return parameter_count(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_heads=model.num_attention_heads,
        num_kv_heads=model.num_query_groups, head_dim=model.kv_channels, ffn_hidden_size=model.ffn_hidden_size,
        vocab_size=vocab_size, gated=model.swiglu, tied=not model.untie_embeddings_and_output_weights,
        bias=model.add_bias_linear, layernorm=model.normalization == "LayerNorm",
        learned_positions=model.max_position_embeddings if model.position_embedding_type == "learned_absolute" else 0)


def flops_per_token(config, vocab_size: int) -> float:
    """Training FLOPs per token of the run ``config`` (:class:`~megatron.training.config.RunConfig`)."""
    model = config.model
    return training_flops_per_token(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_heads=model.num_attention_heads,
        num_kv_heads=model.num_query_groups, head_dim=model.kv_channels, ffn_hidden_size=model.ffn_hidden_size,
        vocab_size=vocab_size, seq_length=config.training.seq_length, gated=model.swiglu)


def device_peak_tflops(override=None):
    """Peak TFLOP/s of this device: ``override``, a known GPU, or None (unknown, e.g. CPU)."""
    if override:
        return override
    from fpdt_ext import runtime

    name = runtime.current().device_name()
    for fragment, peak in PEAK_TFLOPS.items():
        if fragment in name:
            return peak
    return None
