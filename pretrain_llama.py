"""Pretrain a Llama-style model on megatron-core (FPDT with --fpdt).

Llama's architecture is the default here; every flag can still override it:
RMSNorm, SwiGLU, no biases, rotary embeddings, untied embeddings, no dropout.

    torchrun --nproc-per-node 2 pretrain_llama.py --fpdt --fpdt-parallel-size 2 ... (Megatron flags)
"""

import sys

from megatron.training import pretrain

LLAMA_DEFAULTS = dict(
    normalization="RMSNorm",
    swiglu=True,
    add_bias_linear=False,
    position_embedding_type="rope",
    untie_embeddings_and_output_weights=True,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    norm_epsilon=1e-5,
)

if __name__ == "__main__":
    sys.exit(pretrain(defaults=LLAMA_DEFAULTS, description=__doc__))
