"""The FPDT configuration: one frozen object, validated in one place.

Field names follow the command-line flags (``--fpdt-parallel-size`` ->
``fpdt_parallel_size``), so adding an option touches the flag and the field.
In code the FPDT axis is called ``sp`` (``sp_size``, ``sp_rank``, ``sp_group``).

Every check raises ``ValueError`` with a message that says what to change, and
runs before any communication or allocation. :meth:`FPDTConfig.plan` is the one place
where a sequence is cut into chunks: every chunked module asks it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class FPDTConfig:
    """Static FPDT knobs for one model.

    fpdt_parallel_size: ranks in the FPDT sequence-parallel group (P).
    fpdt_chunk_size: tokens per *global* chunk (S/u), as DeepSpeed's
        ``--ds-sequence-parallel-fpdt-chunk-size``; each rank holds
        fpdt_chunk_size/P tokens of every chunk.
    fpdt_num_chunks: alternatively, the number of chunks u directly.
    fpdt_offload: keep chunks not being computed on in host memory.
    offload_dir: with fpdt_offload, keep them in a file in this directory instead (a disk
        tier below host memory, :mod:`fpdt_ext.memory.disk`, which checks the directory when it
        opens its file; the flag ``--offload-dir`` also sends the checkpointed layer inputs there).
    param_grads_once: the chunked MLP sums its parameters' gradients over the chunks in float32
        and hands autograd the sum once, for gradient hooks that take one gradient per parameter
        and backward (Megatron-FSDP with sharded gradients). Otherwise each chunk's gradient
        reaches the parameters' hooks separately (DDP's float32 ``main_grad``, FSDP2).
    """

    fpdt_parallel_size: int = 1
    fpdt_chunk_size: Optional[int] = None
    fpdt_num_chunks: Optional[int] = None
    fpdt_offload: bool = False
    offload_dir: Optional[str] = None
    param_grads_once: bool = False

    def __post_init__(self):
        _require_positive("fpdt_parallel_size", self.fpdt_parallel_size)
        if self.fpdt_chunk_size is not None and self.fpdt_num_chunks is not None:
            raise ValueError(
                "set either fpdt_chunk_size (tokens per chunk) or fpdt_num_chunks, not both"
            )
        if self.fpdt_chunk_size is not None:
            _require_positive("fpdt_chunk_size", self.fpdt_chunk_size)
            if self.fpdt_chunk_size % self.fpdt_parallel_size:
                raise ValueError(
                    f"fpdt_chunk_size {self.fpdt_chunk_size} is not divisible by "
                    f"fpdt_parallel_size {self.fpdt_parallel_size}: every rank holds "
                    f"chunk_size/P tokens of each chunk; use a multiple of "
                    f"{self.fpdt_parallel_size}"
                )
        if self.fpdt_num_chunks is not None:
            _require_positive("fpdt_num_chunks", self.fpdt_num_chunks)
        if self.offload_dir is not None and not self.fpdt_offload:
            raise ValueError("offload_dir holds offloaded chunks: set fpdt_offload too, or no offload_dir")

    def plan(self, local_seq_length: int, sp_group=None, tiers=None) -> "ChunkPlan":
        """How a rank's ``local_seq_length`` tokens are chunked and where the chunks live, on the
        FPDT group ``sp_group`` (None: a group of one; its size must be fpdt_parallel_size).
        ``tiers``: the model's :class:`~fpdt_ext.memory.offload.MemoryTiers` (its directory must be
        ``offload_dir``); None makes private ones (a direct call)."""
        sp_size = 1 if sp_group is None else dist.get_world_size(sp_group)
        if sp_size != self.fpdt_parallel_size:
            raise ValueError(f"the FPDT group has {sp_size} ranks but fpdt_parallel_size is "
                             f"{self.fpdt_parallel_size}")
        if tiers is None:
            from fpdt_ext.memory.offload import MemoryTiers

            tiers = MemoryTiers(self.offload_dir)
        elif self.fpdt_offload and tiers.directory != self.offload_dir:
            raise ValueError(f"the memory tiers' directory {tiers.directory!r} is not offload_dir "
                             f"{self.offload_dir!r}: chunks would go elsewhere than configured")
        return ChunkPlan(sp_group=sp_group, sp_size=sp_size, num_chunks=self.local_chunks(local_seq_length),
                         offload=self.fpdt_offload, tiers=tiers)

    def local_chunks(self, local_seq_length: int) -> int:
        """Chunks of a rank's ``local_seq_length`` tokens (for modules that need no group)."""
        return self.num_chunks(local_seq_length * self.fpdt_parallel_size)

    def num_chunks(self, seq_length: int) -> int:
        """Chunks u for a global sequence of ``seq_length`` tokens (validated)."""
        _require_positive("seq_length", seq_length)
        if self.fpdt_chunk_size is not None:
            if seq_length % self.fpdt_chunk_size:
                raise ValueError(
                    f"sequence length {seq_length} is not divisible by fpdt_chunk_size "
                    f"{self.fpdt_chunk_size}; use a multiple of {self.fpdt_chunk_size} "
                    f"or a chunk size that divides {seq_length}"
                )
            num_chunks = seq_length // self.fpdt_chunk_size
        else:
            num_chunks = self.fpdt_num_chunks or 1
        check_sequence_length(seq_length, self.fpdt_parallel_size, num_chunks)
        return num_chunks

    def validate_model(
        self,
        *,
        seq_length: int,
        num_attention_heads: int,
        num_query_groups: Optional[int] = None,
        tensor_model_parallel_size: int = 1,
    ) -> int:
        """Check a model shape against this config; returns the chunk count."""
        num_chunks = self.num_chunks(seq_length)
        check_heads(
            num_attention_heads,
            num_query_groups or num_attention_heads,
            sp_size=self.fpdt_parallel_size,
            tp_size=tensor_model_parallel_size,
        )
        return num_chunks


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """The chunking of one call, from :meth:`FPDTConfig.plan`: u chunks of the local sequence on a
    group of P ranks; with ``offload``, chunks not being computed on go to ``tiers`` (host
    memory, or its disk when it has a directory)."""

    sp_group: Any
    sp_size: int
    num_chunks: int
    offload: bool
    tiers: Any  # fpdt_ext.memory.offload.MemoryTiers


# The chunked loss (fpdt_ext.mcore.loss): a chunk holds at most this many logits (tokens x local
# vocabulary; 16 MiB in float32), but no fewer than MIN_CHUNK_TOKENS tokens, so the weight-gradient
# GEMM (whose inner size is the chunk's token count) stays efficient. tools/memory_planner.py uses
# the same numbers.
MAX_CHUNK_LOGITS = 1 << 22
MIN_CHUNK_TOKENS = 128


def loss_chunk_tokens(vocab_local: int) -> int:
    """Tokens per loss chunk for a local vocabulary size."""
    return max(MIN_CHUNK_TOKENS, MAX_CHUNK_LOGITS // vocab_local)


def loss_chunks(tokens: int, vocab_local: int, at_least: int = 1) -> int:
    """Chunks for the loss over ``tokens`` tokens: at least ``at_least``, and enough that none
    holds more than :func:`loss_chunk_tokens` tokens (the loss's memory is one chunk of logits,
    whatever the attention chunk size)."""
    return min(tokens, max(at_least, -(-tokens // loss_chunk_tokens(vocab_local))))


def _require_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_sequence_length(seq_length: int, sp_size: int, num_chunks: int) -> None:
    """The global sequence must split into sp_size*num_chunks equal sub-chunks."""
    multiple = sp_size * num_chunks
    if seq_length % multiple:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by "
            f"fpdt_parallel_size*num_chunks = {multiple}; use a multiple of {multiple}"
        )


def check_heads(num_heads: int, num_kv_heads: int, *, sp_size: int, tp_size: int = 1) -> None:
    """Heads split over TP first, then over the FPDT group; KV heads may be replicated."""
    _require_positive("num_attention_heads", num_heads)
    _require_positive("num_query_groups", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads {num_heads} is not divisible by num_query_groups "
            f"{num_kv_heads}; each key/value head must serve the same number of query heads"
        )
    if num_heads % (tp_size * sp_size):
        raise ValueError(
            f"num_attention_heads {num_heads} is not divisible by "
            f"tensor_model_parallel_size*fpdt_parallel_size = {tp_size * sp_size}; "
            f"use a head count that is a multiple of {tp_size * sp_size} or smaller parallel sizes"
        )
    if num_kv_heads % tp_size:
        raise ValueError(
            f"num_query_groups {num_kv_heads} is not divisible by tensor_model_parallel_size "
            f"{tp_size} (Megatron splits key/value heads over TP); use a TP size that divides "
            f"{num_kv_heads}"
        )


def kv_replication(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """How many times to repeat each KV head so the FPDT group can split them.

    After the sequence->head all-to-all, rank r holds query heads
    [r*H/P, (r+1)*H/P). It needs the KV heads they map to, laid out as a
    contiguous group of its own. Repeating every KV head ``rep`` times works
    when P divides kv*rep (so KV heads split evenly) and kv*rep divides H (so
    each rank's query heads still map onto its KV heads as plain GQA). The
    smallest such rep is returned; rep = H/kv (full MHA) always works.
    """
    group = num_heads // num_kv_heads
    for rep in range(1, group + 1):
        if group % rep == 0 and (num_kv_heads * rep) % sp_size == 0:
            return rep
    raise ValueError(  # unreachable when check_heads passed
        f"cannot split {num_kv_heads} KV heads over {sp_size} ranks for {num_heads} heads"
    )


def check_attention_inputs(q, k, v, *, sp_size: int, num_chunks: int) -> None:
    """Validate local q/k/v pieces of ``fpdt_attention`` (shapes [s, b, h, d])."""
    _require_positive("num_chunks", num_chunks)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape [s_local, batch, heads, head_dim], got {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.is_floating_point():
        raise ValueError(f"attention needs floating point inputs, got {q.dtype}")
    s, b, _, d = q.shape
    _same("sequence length (dim 0)", (q.shape[0], k.shape[0], v.shape[0]))
    _same("batch size (dim 1)", (q.shape[1], k.shape[1], v.shape[1]))
    _same("head dim (dim 3)", (q.shape[3], k.shape[3], v.shape[3]))
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    check_heads(q.shape[2], k.shape[2], sp_size=sp_size)
    if s % num_chunks:
        raise ValueError(
            f"local sequence length {s} is not divisible by num_chunks {num_chunks}; use a "
            f"global sequence length that is a multiple of fpdt_parallel_size*num_chunks = "
            f"{sp_size * num_chunks}"
        )
    if s == 0 or b == 0 or d == 0:
        raise ValueError(f"empty attention input of shape {tuple(q.shape)}")


def _same(what: str, values: Sequence[int]) -> None:
    if len(set(values)) != 1:
        raise ValueError(f"q, k and v disagree on {what}: {tuple(values)}")


def default_softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
