"""FPDTConfig and the shape checks: invalid combinations say what to change."""

import pytest

from fpdt_ext.core.config import FPDTConfig, check_heads, kv_replication


def test_chunk_size_gives_chunk_count():
    config = FPDTConfig(fpdt_parallel_size=4, fpdt_chunk_size=4096, fpdt_offload=True)
    assert config.num_chunks(65536) == 16
    assert FPDTConfig(fpdt_parallel_size=2, fpdt_num_chunks=3).num_chunks(12) == 3
    assert FPDTConfig().num_chunks(7) == 1


def test_indivisible_sequence_says_what_to_use():
    with pytest.raises(ValueError, match=r"sequence length 10002 is not divisible by fpdt_parallel_size\*num_chunks = 8; use a multiple of 8"):
        FPDTConfig(fpdt_parallel_size=2, fpdt_num_chunks=4).num_chunks(10002)
    with pytest.raises(ValueError, match="not divisible by fpdt_chunk_size 3000"):
        FPDTConfig(fpdt_parallel_size=2, fpdt_chunk_size=3000).num_chunks(8192)


@pytest.mark.parametrize("kwargs,match", [
    (dict(fpdt_parallel_size=0), "fpdt_parallel_size must be a positive integer"),
    (dict(fpdt_parallel_size=2, fpdt_chunk_size=3), "use a multiple of 2"),
    (dict(fpdt_chunk_size=8, fpdt_num_chunks=2), "either fpdt_chunk_size"),
    (dict(fpdt_num_chunks=-1), "fpdt_num_chunks must be a positive integer"),
])
def test_invalid_config_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FPDTConfig(**kwargs)


def test_validate_model_checks_heads_against_tp_times_fpdt():
    config = FPDTConfig(fpdt_parallel_size=4, fpdt_chunk_size=64)
    assert config.validate_model(seq_length=256, num_attention_heads=32, num_query_groups=8,
                                 tensor_model_parallel_size=2) == 4
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size\*fpdt_parallel_size = 8"):
        config.validate_model(seq_length=256, num_attention_heads=12, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="num_query_groups 3 is not divisible by tensor_model_parallel_size 2"):
        check_heads(12, 3, sp_size=1, tp_size=2)
    with pytest.raises(ValueError, match="num_attention_heads 12 is not divisible by num_query_groups 5"):
        check_heads(12, 5, sp_size=1)


@pytest.mark.parametrize("heads,kv_heads,sp_size,expected", [
    (32, 8, 4, 1),   # KV heads split evenly
    (32, 8, 8, 1),
    (32, 8, 16, 2),  # fewer KV heads than ranks: each is replicated
    (8, 1, 4, 4),    # MQA
    (12, 6, 4, 2),   # neither divides the other
    (8, 8, 8, 1),
])
def test_kv_replication(heads, kv_heads, sp_size, expected):
    rep = kv_replication(heads, kv_heads, sp_size)
    assert rep == expected
    assert (kv_heads * rep) % sp_size == 0 and heads % (kv_heads * rep) == 0
