"""The FPDT token layout: shard/unshard round trips and the span property."""

import pytest
import torch

from fpdt_ext.core.layout import fpdt_global_positions, fpdt_shard, fpdt_shard_batch, fpdt_unshard


@pytest.mark.parametrize("sp_size,num_chunks", [(1, 1), (1, 4), (2, 1), (2, 3), (4, 2), (4, 8), (3, 5)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_round_trip(sp_size, num_chunks, dim):
    seq = sp_size * num_chunks * 2
    shape = [5, 3, 4]
    shape[dim] = seq
    x = torch.randn(shape)
    pieces = [fpdt_shard(x, dim=dim, sp_rank=r, sp_size=sp_size, num_chunks=num_chunks) for r in range(sp_size)]
    assert all(p.shape[dim] == seq // sp_size for p in pieces)
    assert torch.equal(fpdt_unshard(pieces, dim=dim, num_chunks=num_chunks), x)


@pytest.mark.parametrize("sp_size,num_chunks", [(2, 3), (4, 2), (3, 4)])
def test_rank_holds_sub_chunks_r_plus_kP(sp_size, num_chunks):
    seq = sp_size * num_chunks * 3
    sub = seq // (sp_size * num_chunks)
    for rank in range(sp_size):
        pos = fpdt_global_positions(seq, sp_rank=rank, sp_size=sp_size, num_chunks=num_chunks)
        expected = torch.cat([torch.arange(sub) + (i * sp_size + rank) * sub for i in range(num_chunks)])
        assert torch.equal(pos, expected)


@pytest.mark.parametrize("sp_size,num_chunks", [(2, 3), (4, 4)])
def test_chunk_i_of_all_ranks_is_a_contiguous_span(sp_size, num_chunks):
    """What the all-to-all of local chunk i gathers is global span [i*S/u, (i+1)*S/u)."""
    seq = sp_size * num_chunks * 2
    local = seq // sp_size
    c = local // num_chunks
    pos = [fpdt_global_positions(seq, sp_rank=r, sp_size=sp_size, num_chunks=num_chunks) for r in range(sp_size)]
    for i in range(num_chunks):
        gathered = torch.cat([p[i * c:(i + 1) * c] for p in pos])
        assert torch.equal(gathered, torch.arange(i * seq // num_chunks, (i + 1) * seq // num_chunks))


def test_shard_batch_permutes_every_sequence_tensor():
    seq, sp_size, num_chunks = 24, 2, 3
    tokens = torch.arange(2 * seq).view(2, seq)
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, seq),
             "position_ids": torch.arange(seq).expand(2, seq), "extra": None}
    out = fpdt_shard_batch(batch, sp_rank=1, sp_size=sp_size, num_chunks=num_chunks)
    positions = fpdt_global_positions(seq, sp_rank=1, sp_size=sp_size, num_chunks=num_chunks)
    assert torch.equal(out["tokens"], tokens[:, positions])
    assert torch.equal(out["labels"], tokens[:, positions] + 1)
    assert torch.equal(out["position_ids"][0], positions)
    assert out["extra"] is None
    # a token-summed loss is unchanged by the permutation
    assert out["loss_mask"].sum() * sp_size == batch["loss_mask"].sum()


def test_shard_batch_rejects_attention_mask():
    with pytest.raises(ValueError, match="attention_mask"):
        fpdt_shard_batch({"attention_mask": torch.ones(1, 1, 8, 8)}, sp_rank=0, sp_size=2, num_chunks=2, seq_dim=2)


def test_bad_layouts_raise_clear_errors():
    with pytest.raises(ValueError, match="use a multiple of 8"):
        fpdt_shard(torch.zeros(10), dim=0, sp_rank=0, sp_size=2, num_chunks=4)
    with pytest.raises(ValueError, match="outside the FPDT group"):
        fpdt_shard(torch.zeros(8), dim=0, sp_rank=2, sp_size=2, num_chunks=1)
    with pytest.raises(ValueError, match="one shape"):
        fpdt_unshard([torch.zeros(4), torch.zeros(6)], dim=0, num_chunks=2)
