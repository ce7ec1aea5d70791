"""FPDT: the Fully Pipelined Distributed Transformer extension for megatron-core.

Model-agnostic pieces: the token layout, the chunk all-to-all, the block
attention kernel adapter, host offload, and the chunked attention itself.
"""

from fpdt_ext.attention import fpdt_attention
from fpdt_ext.config import FPDTConfig
from fpdt_ext.layout import fpdt_shard, fpdt_unshard

__all__ = ["FPDTConfig", "fpdt_attention", "fpdt_shard", "fpdt_unshard"]
