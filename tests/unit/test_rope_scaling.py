"""Scaled RoPE in our model: the rotary angles of ``ScaledRotaryEmbedding`` (megatron/training/models.py)
against transformers' (Llama 3.1's ``llama3`` scaling at any of its four parameters, linear position
interpolation, YaRN with its attention factor, all off), and the flags' checks.
tests/e2e/test_convert.py compares whole models; tests/distributed/test_model_parity.py FPDT
against the baseline."""

from __future__ import annotations

import dataclasses
import math

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


# -- YaRN --------------------------------------------------------------------------------

YARN = {  # transformers' rope_parameters (rope_type yarn): defaults, each parameter, and the edge cases
    "defaults": {"factor": 4.0, "original_max_position_embeddings": 32},
    "betas_no_truncate": {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 2.0,
                          "truncate": False},
    "mscale_ratio": {"factor": 16.0, "original_max_position_embeddings": 20, "mscale": 0.707, "mscale_all_dim": 0.5},
    "mscale_alone_ignored": {"factor": 2.0, "original_max_position_embeddings": 48, "mscale": 0.9},
    "zero_width_ramp": {"factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 4.0, "beta_slow": 4.0,
                        "truncate": False},
    "explicit_attention_factor": {"factor": 4.0, "original_max_position_embeddings": 32,
                                  "attention_factor": 0.1 * math.log(4.0) + 1.0},
    "other_attention_factor": {"factor": 8.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
    "attention_factor_below_1": {"factor": 8.0, "original_max_position_embeddings": 32, "attention_factor": 0.9},
}


def _yarn_ours(hf: dict, positions: int, head_dim: int, base: float, rotary_percent: float = 1.0):
    """(angles [positions, rotary dim / 2], attention factor) of our model built with the fields the
    converter maps ``hf`` to: the frequencies from ScaledRotaryEmbedding, the factor as attention
    takes it from the run's TransformerConfig."""
    from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

    from megatron.training.config import DataConfig, RunConfig, TrainingConfig
    from megatron.training.models import ScaledRotaryEmbedding, transformer_config
    from tools.checkpoint.checks import hf_config_problems
    from tools.checkpoint.convert import _rope_scaling_fields

    c = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "max_position_embeddings": positions,
         "rope_parameters": {"rope_theta": base, "rope_type": "yarn", **hf}}
    assert hf_config_problems("llama", c) == []
    model = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=head_dim,
                        rotary_base=base, rotary_percent=rotary_percent, **_rope_scaling_fields(c))
    assert model.position_embedding_type == "yarn"
    tcfg = transformer_config(RunConfig(model=model, training=TrainingConfig(seq_length=positions, train_iters=1),
                                        data=DataConfig(mock_data=True)))
    angles = ScaledRotaryEmbedding(model, tcfg).get_freqs_non_repeated(positions)
    return angles, _yarn_get_concentration_factor_from_config(tcfg)


def _yarn_theirs(hf: dict, positions: int, head_dim: int, base: float, rotary_percent: float = 1.0):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    partial = {"partial_rotary_factor": rotary_percent} if rotary_percent < 1 else {}
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=positions,
                                      rope_parameters={"rope_theta": base, "rope_type": "yarn", **hf, **partial})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    return torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq), attention_factor


@pytest.mark.parametrize("head_dim,base,rotary_percent", [(16, BASE, 1.0), (64, 500000.0, 1.0), (32, BASE, 0.5)],
                         ids=["d16", "d64_base5e5", "d32_partial"])
@pytest.mark.parametrize("name", sorted(YARN))
def test_yarn_gives_transformers_angles_and_attention_factor(name, head_dim, base, rotary_percent):
    """transformers' YaRN parameters through the converter's mapping: our rotary angles (bit for bit on
    the CPU) and the factor attention scales cos and sin by are transformers'."""
    hf = YARN[name]
    ours, our_factor = _yarn_ours(hf, 256, head_dim, base, rotary_percent)
    theirs, their_factor = _yarn_theirs(hf, 256, head_dim, base, rotary_percent)
    assert ours.shape == theirs.shape == (256, int(head_dim * rotary_percent) // 2)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    assert our_factor == pytest.approx(their_factor, rel=1e-12, abs=0)  # to the ulp (an explicit factor: 12 digits)
    plain = torch.outer(torch.arange(256, dtype=torch.float32),
                        1.0 / base ** (torch.arange(0, ours.shape[1] * 2, 2).float() / (ours.shape[1] * 2)))
    assert (ours - plain).abs().max() > 1.0  # YaRN matters at these positions
    assert abs(their_factor - 1) > 0.05  # and so does the attention factor (the test is not blind to it)


def test_yarn_frequencies_are_megatron_cores_over_the_whole_head():
    """megatron-core's YarnRotaryEmbedding computes the same frequencies (it rotates the whole head)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_find_correction_range
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_linear_ramp_mask

    from megatron.training.models import yarn_inv_freq

    for dim, base, factor, original, fast, slow, round_to_int in [(16, 1e4, 4.0, 32, 32.0, 1.0, True),
                                                                   (64, 5e5, 8.0, 64, 16.0, 2.0, False)]:
        extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        low, high = _yarn_find_correction_range(fast, slow, dim, base, original, round_to_int)
        mask = 1.0 - _yarn_linear_ramp_mask(low, high, dim // 2, device="cpu")
        assert torch.equal(yarn_inv_freq(dim, base, factor, original, fast, slow, round_to_int),
                           inter * (1 - mask) + extra * mask)


def test_the_converters_attention_factor_is_megatron_cores():
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    from tools.checkpoint.checks import yarn_attention_factor

    for factor, mscale, mscale_all_dim in [(4.0, 1.0, 0.0), (16.0, 0.707, 0.5), (40.0, 1.0, 1.0), (0.5, 2.0, 0.0),
                                           (8.0, 0.0, 0.3)]:
        assert yarn_attention_factor(factor, mscale, mscale_all_dim) == _yarn_get_concentration_factor(
            factor, mscale, mscale_all_dim)


def _yarn_model(**yarn):
    return _model(**{"position_embedding_type": "yarn", **yarn})


@pytest.mark.parametrize("yarn,message", [
    ({"rotary_scaling_factor": 0.0}, "--rotary-scaling-factor 0 is out of range: it must be > 0"),
    ({"yarn_beta_fast": 1.0, "yarn_beta_slow": 2.0}, "--yarn-beta-fast 1 must be at least --yarn-beta-slow 2"),
    ({"mscale": -1.0}, "--mscale -1 is out of range: it must be >= 0"),
    ({"yarn_original_max_position_embeddings": 0}, "--yarn-original-max-position-embeddings must be positive"),
    ({"position_embedding_type": "rope", "rotary_scaling_factor": 4.0},
     "--rotary-scaling-factor 4 is YaRN's: it needs --position-embedding-type yarn (this model has rope)"),
    ({"position_embedding_type": "rope", "yarn_correction_range_round_to_int": False},
     "--no-yarn-correction-range-round-to-int is YaRN's: it needs --position-embedding-type yarn"),
    ({"use_rope_scaling": True}, "--use-rope-scaling scales RoPE: it needs --position-embedding-type rope (this "
                                 "model has yarn)"),
])
def test_bad_yarn_flags_are_refused_saying_what_to_change(yarn, message):
    with pytest.raises(ValueError) as e:
        _yarn_model(**yarn)
    assert message in str(e.value)


def test_the_yarn_flags_reach_the_model_config():
    from megatron.training.arguments import parse_args, validate_args

    args = validate_args(parse_args([
        "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "1", "--train-iters", "1", "--mock-data", "--vocab-size", "64",
        "--position-embedding-type", "yarn", "--rotary-scaling-factor", "4", "--yarn-original-max-position-embeddings",
        "16", "--yarn-beta-fast", "8", "--yarn-beta-slow", "2", "--mscale", "0.5", "--mscale-all-dim", "0.25",
        "--no-yarn-correction-range-round-to-int"]), world_size=1)
    m = args.model
    assert (m.position_embedding_type, m.rotary_scaling_factor, m.yarn_original_max_position_embeddings,
            m.yarn_beta_fast, m.yarn_beta_slow, m.mscale, m.mscale_all_dim,
            m.yarn_correction_range_round_to_int) == ("yarn", 4.0, 16, 8.0, 2.0, 0.5, 0.25, False)


def test_a_stage_may_switch_between_rope_and_yarn_with_a_note(monkeypatch):
    """Between RoPE and YaRN no weight changes shape: loading is allowed and each change said;
    learned positions against YaRN are another model."""
    from megatron.training import checkpointing
    from megatron.training.checkpointing import CheckpointError, model_for_checkpoint

    said = []
    monkeypatch.setattr(checkpointing, "_print0", said.append)
    rope = _model(max_position_embeddings=32)
    yarn = _yarn_model(max_position_embeddings=64, rotary_scaling_factor=2.0, yarn_original_max_position_embeddings=32)
    common = {"model_args": dataclasses.asdict(rope), "true_vocab_size": 64, "padded_vocab_size": 128}
    assert model_for_checkpoint(common, "ckpt", yarn, 64, 1) == 128
    out = "\n".join(said)
    assert "was trained with --position-embedding-type rope; this run uses yarn" in out
    assert "was trained with --rotary-scaling-factor 1.0; this run uses 2.0" in out
    assert "--yarn-original-max-position-embeddings 4096; this run uses 32" in out
    learned = _model(position_embedding_type="learned_absolute", max_position_embeddings=64)
    with pytest.raises(CheckpointError, match="--position-embedding-type learned_absolute \\(this run: yarn\\)"):
        model_for_checkpoint({**common, "model_args": dataclasses.asdict(learned)}, "ckpt", yarn, 64, 1)


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 0.0), (0.5, 0.0), (0.707, 0.5), (0.0, 0.0), (0.0, 0.3),
                                                   (1.0, 1.0)])
def test_yarn_exports_the_attention_factor_our_model_applies(mscale, mscale_all_dim):
    """Every --mscale / --mscale-all-dim exports to a config.json whose attention factor in
    transformers is the one megatron-core's attention applies, and imports back to the same model."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tools.checkpoint import convert

    model = _yarn_model(num_query_groups=4, max_position_embeddings=128, rotary_scaling_factor=8.0,
                        yarn_original_max_position_embeddings=16, mscale=mscale, mscale_all_dim=mscale_all_dim,
                        normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                        untie_embeddings_and_output_weights=True, attention_dropout=0.0, hidden_dropout=0.0,
                        make_vocab_size_divisible_by=64)
    exported = convert.hf_config_from_args("llama", dataclasses.asdict(model), 64)
    config = transformers.LlamaConfig(**{k: v for k, v in exported.items() if k not in ("architectures",)})
    _, theirs = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    assert theirs == pytest.approx(_yarn_get_concentration_factor(8.0, mscale, mscale_all_dim), rel=1e-12, abs=0)
    back = convert.model_config_from_hf("llama", exported)
    assert (back.mscale, back.mscale_all_dim, back.rotary_scaling_factor) == (mscale, mscale_all_dim, 8.0)
