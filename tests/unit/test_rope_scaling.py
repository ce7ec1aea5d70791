"""Scaled RoPE in our model: the rotary angles of ``ScaledRotaryEmbedding`` (megatron/training/models.py)
against transformers' (Llama 3.1's ``llama3`` scaling at any of its four parameters, linear position
interpolation, both off), and the flags' checks. tests/e2e/test_convert.py compares whole models."""

from __future__ import annotations

import pytest
import torch

from megatron.training.config import ModelConfig

transformers = pytest.importorskip("transformers")
HEAD_DIM, BASE = 16, 10000.0


def _model(**rope):
    return ModelConfig(**{"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
                          "position_embedding_type": "rope", "rotary_base": BASE, **rope})


def _ours(model: ModelConfig, positions: int) -> torch.Tensor:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.training.models import ScaledRotaryEmbedding

    tcfg = TransformerConfig(num_layers=1, hidden_size=model.hidden_size,
                             num_attention_heads=model.num_attention_heads, use_cpu_initialization=True)
    return ScaledRotaryEmbedding(model, tcfg).get_freqs_non_repeated(positions)  # [positions, d/2]


def _theirs(rope_parameters: dict, positions: int) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=positions,
                                      rope_parameters={"rope_theta": BASE, **rope_parameters})
    init = ROPE_INIT_FUNCTIONS.get(rope_parameters["rope_type"])
    inv_freq = init(config, "cpu")[0] if init else 1.0 / BASE ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    return torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)


@pytest.mark.parametrize("factor,low,high,original", [(8.0, 1.0, 4.0, 32), (32.0, 2.0, 8.0, 64), (4.0, 1.0, 2.0, 20)])
def test_llama3_scaling_gives_transformers_angles(factor, low, high, original):
    ours = _ours(_model(use_rope_scaling=True, rope_scaling_factor=factor, rope_scaling_low_freq_factor=low,
                        rope_scaling_high_freq_factor=high,
                        rope_scaling_original_max_position_embeddings=original), 256)
    theirs = _theirs({"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                      "original_max_position_embeddings": original}, 256)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-4)
    plain = _theirs({"rope_type": "default"}, 256)
    assert (ours - plain).abs().max() > 1.0  # the scaling matters at these positions


def test_the_llama3_defaults_are_megatron_cores():
    """A checkpoint saved before the three parameters were flags (megatron-core's fixed 1, 4, 8192)
    rebuilds with the same frequencies."""
    ours = _ours(_model(use_rope_scaling=True, rope_scaling_factor=8.0), 64)
    theirs = _theirs({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("rope,theirs", [({"rotary_seq_len_interpolation_factor": 4.0}, {"rope_type": "linear",
                                                                                          "factor": 4.0}),
                                         ({}, {"rope_type": "default"})], ids=["linear", "none"])
def test_linear_interpolation_and_plain_rope_give_transformers_angles(rope, theirs):
    torch.testing.assert_close(_ours(_model(**rope), 256), _theirs(theirs, 256), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("rope,message", [
    ({"rope_scaling_low_freq_factor": 4.0, "rope_scaling_high_freq_factor": 4.0},
     "--rope-scaling-high-freq-factor 4 must be larger than --rope-scaling-low-freq-factor 4"),
    ({"rope_scaling_low_freq_factor": 0.0}, "--rope-scaling-low-freq-factor 0 is out of range: it must be > 0"),
    ({"rope_scaling_original_max_position_embeddings": 0},
     "--rope-scaling-original-max-position-embeddings must be positive, got 0"),
    ({"rotary_seq_len_interpolation_factor": 0.5},
     "--rotary-seq-len-interpolation-factor 0.5 is out of range: it must be >= 1"),
    ({"use_rope_scaling": True, "position_embedding_type": "learned_absolute"},
     "--use-rope-scaling scales RoPE: it needs --position-embedding-type rope (this model has learned_absolute)"),
    ({"rotary_seq_len_interpolation_factor": 2.0, "position_embedding_type": "learned_absolute"},
     "--rotary-seq-len-interpolation-factor scales RoPE: it needs --position-embedding-type rope"),
])
def test_bad_rope_scaling_flags_are_refused_saying_what_to_change(rope, message):
    with pytest.raises(ValueError) as e:
        _model(**rope)
    assert message in str(e.value)


def test_the_flags_reach_the_model_config():
    from megatron.training.arguments import parse_args, validate_args

    args = validate_args(parse_args([
        "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "1", "--train-iters", "1", "--mock-data", "--vocab-size", "64",
        "--position-embedding-type", "rope", "--use-rope-scaling", "--rope-scaling-factor", "16",
        "--rope-scaling-low-freq-factor", "2", "--rope-scaling-high-freq-factor", "8",
        "--rope-scaling-original-max-position-embeddings", "16", "--rotary-seq-len-interpolation-factor", "2"]),
        world_size=1)
    m = args.model
    assert (m.use_rope_scaling, m.rope_scaling_factor, m.rope_scaling_low_freq_factor, m.rope_scaling_high_freq_factor,
            m.rope_scaling_original_max_position_embeddings, m.rotary_seq_len_interpolation_factor) == (
        True, 16.0, 2.0, 8.0, 16, 2.0)
