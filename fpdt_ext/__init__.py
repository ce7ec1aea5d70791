"""FPDT: the Fully Pipelined Distributed Transformer extension for megatron-core.

Model-agnostic pieces: the token layout, the chunk all-to-all, the block
attention kernel adapter, host offload, and the chunked attention itself (on
q/k/v, or from hidden states with the QKV projection inside the chunk loop).
"""

from fpdt_ext.attention import fpdt_attention
from fpdt_ext.config import FPDTConfig
from fpdt_ext.layout import fpdt_shard, fpdt_unshard
from fpdt_ext.qkv import InputNorm, QKVLayout, fpdt_qkv_attention

__all__ = ["FPDTConfig", "InputNorm", "QKVLayout", "fpdt_attention", "fpdt_qkv_attention", "fpdt_shard", "fpdt_unshard"]
