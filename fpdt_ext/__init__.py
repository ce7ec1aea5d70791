"""FPDT: the Fully Pipelined Distributed Transformer, for megatron-core.

    fpdt_ext.core      the algorithm in plain torch: config and chunk plan, token layout, the
                       chunk all-to-all, the block-attention kernel adapter, the chunked attention
                       (on q/k/v, or from hidden states with the QKV projection inside the loop)
                       and the chunked norm functions
    fpdt_ext.memory    where chunks live: host offload (pinned pool, side stream), checkpointed
                       inputs on the host, the disk tier
    fpdt_ext.mcore     megatron-core's side: the layer spec and its modules, the chunked loss,
                       FPDTGPTModel, the process groups
    fpdt_ext.testing   running a function on N local processes
    fpdt_ext.runtime   CPU or GPU: device, process-group backend, memory readings

Imports go one way: testing -> mcore -> core -> memory, and any of them -> runtime; core and
memory import nothing from megatron-core. The names below are core's public API.
"""

from fpdt_ext.core.attention import fpdt_attention
from fpdt_ext.core.config import ChunkPlan, FPDTConfig
from fpdt_ext.core.layout import fpdt_shard, fpdt_unshard
from fpdt_ext.core.norm import InputNorm
from fpdt_ext.core.qkv import QKVLayout, fpdt_qkv_attention

__all__ = ["ChunkPlan", "FPDTConfig", "InputNorm", "QKVLayout", "fpdt_attention", "fpdt_qkv_attention", "fpdt_shard",
           "fpdt_unshard"]
