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


def count_parameters(args, vocab_size: int) -> int:
    """Parameters of the GPT/Llama model the arguments describe (all ranks together)."""
    h, d, f = args.hidden_size, args.kv_channels, args.ffn_hidden_size
    heads, kv = args.num_attention_heads, args.num_query_groups
    bias = args.add_bias_linear
    norm = 2 * h if args.normalization == "LayerNorm" else h
    attention = h * (heads + 2 * kv) * d + heads * d * h + (bias and (heads + 2 * kv) * d + h)
    mlp = h * f * (2 if args.swiglu else 1) + f * h + (bias and f * (2 if args.swiglu else 1) + h)
    layer = attention + mlp + 2 * norm
    embeddings = vocab_size * h * (1 if not args.untie_embeddings_and_output_weights else 2)
    if args.position_embedding_type == "learned_absolute":
        embeddings += args.max_position_embeddings * h
    return args.num_layers * layer + norm + embeddings


def flops_per_token_from_args(args, vocab_size: int) -> float:
    return training_flops_per_token(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_heads=args.num_attention_heads,
        num_kv_heads=args.num_query_groups, head_dim=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size, seq_length=args.seq_length, gated=args.swiglu)


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
