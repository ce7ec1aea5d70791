"""The FPDT token layout.

With global length S, FPDT size P and u chunks, the sequence is cut into u*P
sub-chunks of S/(u*P) tokens. Rank r holds sub-chunks r, r+P, r+2P, ... in that
order, so its local chunk i is global sub-chunk i*P + r. After the
sequence->head all-to-all of local chunk i, every rank holds the contiguous
global span [i*S/u, (i+1)*S/u) for its heads.

Tokens, labels, loss mask and position ids are all permuted this way before the
model sees them; a loss that sums over tokens is unchanged by the permutation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fpdt_ext.core.config import check_sequence_length


def fpdt_shard(x: torch.Tensor, *, dim: int, sp_rank: int, sp_size: int, num_chunks: int) -> torch.Tensor:
    """Rank ``sp_rank``'s piece of the full-sequence tensor ``x`` (contiguous)."""
    dim = dim % x.dim()
    seq = x.size(dim)
    check_sequence_length(seq, sp_size, num_chunks)
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank {sp_rank} is outside the FPDT group of size {sp_size}")
    sub = seq // (sp_size * num_chunks)
    pieces = x.unflatten(dim, (num_chunks, sp_size, sub))  # [..., u, P, S/(uP), ...]
    return pieces.select(dim + 1, sp_rank).flatten(dim, dim + 1).contiguous()  # [..., S/P, ...]


def fpdt_unshard(pieces: Sequence[torch.Tensor], *, dim: int, num_chunks: int) -> torch.Tensor:
    """Inverse of :func:`fpdt_shard`: the full sequence from all ranks' pieces (rank order)."""
    if not pieces:
        raise ValueError("fpdt_unshard needs the pieces of every rank, got none")
    dim = dim % pieces[0].dim()
    local = pieces[0].size(dim)
    if any(p.shape != pieces[0].shape for p in pieces):
        raise ValueError(f"all pieces must have one shape, got {[tuple(p.shape) for p in pieces]}")
    if local % num_chunks:
        raise ValueError(f"local length {local} is not divisible by num_chunks {num_chunks}")
    split = [p.unflatten(dim, (num_chunks, local // num_chunks)) for p in pieces]  # [..., u, S/(uP), ...]
    return torch.stack(split, dim=dim + 1).flatten(dim, dim + 2)  # [..., u, P, S/(uP), ...] -> [..., S, ...]


def fpdt_global_positions(
    seq_length: int, *, sp_rank: int, sp_size: int, num_chunks: int, device=None
) -> torch.Tensor:
    """Global token index of each local token: the position ids of rank ``sp_rank``."""
    positions = torch.arange(seq_length, device=device)
    return fpdt_shard(positions, dim=0, sp_rank=sp_rank, sp_size=sp_size, num_chunks=num_chunks)


def fpdt_shard_batch(
    batch: Mapping[str, torch.Tensor],
    *,
    sp_rank: int,
    sp_size: int,
    num_chunks: int,
    seq_dim: int = 1,
) -> dict:
    """Shard every sequence-shaped entry of a Megatron batch (``tokens``, ``labels``,
    ``loss_mask``, ``position_ids``; ``[b, S]`` by default) to the FPDT layout.

    Entries that are None pass through. ``attention_mask`` is rejected: FPDT
    attention is causal by construction and takes no mask.
    """
    out = {}
    for name, value in batch.items():
        if value is None:
            out[name] = None
        elif name == "attention_mask":
            raise ValueError(
                "FPDT attention is causal and takes no attention_mask; drop it from the batch "
                "(build the dataset with create_attention_mask=False)"
            )
        else:
            out[name] = fpdt_shard(value, dim=seq_dim, sp_rank=sp_rank, sp_size=sp_size, num_chunks=num_chunks)
    return out
