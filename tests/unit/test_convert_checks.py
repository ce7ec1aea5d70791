"""What the Hugging Face <-> megatron-core converter refuses (tools/checkpoint/convert.py), as pure
functions on tiny configs and weights: other architectures, config values that change the
computation, weights the mapping would drop or lacks, checkpoints of ours the requested Hugging
Face class cannot express, and unreadable inputs (one line, exit code 2 from ``main``).
tests/e2e/test_convert.py runs the same refusals on checkpoints transformers writes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tools.checkpoint import checks, convert
from tools.checkpoint.checks import ConversionError

pytestmark = pytest.mark.fault  # the fault-injection tier (pytest -m fault)


VOCAB = 96
DROP = object()  # a config key to remove


def llama_config(**changes):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "tie_word_embeddings": False,
         "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "attention_dropout": 0.0,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    return _changed(c, changes)


def gpt2_config(**changes):
    c = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2,
         "n_head": 4, "n_inner": None, "n_positions": 64, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
         "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
         "add_cross_attention": False, "tie_word_embeddings": True, "resid_pdrop": 0.1}
    return _changed(c, changes)


CONFIGS = {"llama": llama_config, "gpt2": gpt2_config}


def _changed(c, changes):
    c.update(changes)
    return {k: v for k, v in c.items() if v is not DROP}


def refusal(fn, *args) -> str:
    with pytest.raises(ConversionError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


# -- config.json -------------------------------------------------------------------------


def test_supported_configs_keep_their_values():
    m = convert.model_config_from_hf("llama", llama_config(head_dim=16, pretraining_tp=2, tie_word_embeddings=True))
    assert (m.kv_channels, m.num_query_groups, m.untie_embeddings_and_output_weights) == (16, 2, False)
    assert (m.swiglu, m.add_bias_linear, m.position_embedding_type, m.normalization) == (True, False, "rope", "RMSNorm")
    exact = convert.model_config_from_hf("gpt2", gpt2_config(activation_function="gelu", reorder_and_upcast_attn=True,
                                                             n_inner=80))
    assert (exact.openai_gelu, exact.ffn_hidden_size, exact.kv_channels) == (False, 80, 8)
    assert convert.model_config_from_hf("gpt2", gpt2_config()).openai_gelu is True
    # an older config: architectures only, no model_type
    convert.model_config_from_hf("llama", llama_config(model_type=DROP))


@pytest.mark.parametrize("model_type,config,said,hint", [
    ("llama", llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
     "says Qwen2ForCausalLM (model_type qwen2)", ""),
    ("llama", llama_config(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096),
     "says MistralForCausalLM (model_type mistral)", ""),
    ("llama", llama_config(architectures=["LlamaForSequenceClassification"]),
     "says LlamaForSequenceClassification (model_type llama)", ""),
    ("llama", gpt2_config(), "says GPT2LMHeadModel (model_type gpt2)", "; pass --model-type gpt2"),
    ("gpt2", llama_config(), "says LlamaForCausalLM (model_type llama)", "; pass --model-type llama"),
    ("llama", llama_config(architectures=DROP, model_type=DROP), "says no architectures (model_type None)", ""),
], ids=["qwen2", "mistral", "llama-classifier", "gpt2-as-llama", "llama-as-gpt2", "unnamed"])
def test_another_architecture_is_refused_by_name(model_type, config, said, hint):
    message = refusal(convert.model_config_from_hf, model_type, config, "hf/config.json")
    assert message == (f"hf/config.json {said}; the converter supports LlamaForCausalLM (--model-type llama) and "
                       f"GPT2LMHeadModel (--model-type gpt2){hint}")


@pytest.mark.parametrize("changes,named", [
    ({"attention_bias": True}, "attention_bias true (supported: false"),
    ({"mlp_bias": True}, "mlp_bias true (supported: false"),
    ({"sliding_window": 4096}, "sliding_window 4096 (supported: null"),
    ({"use_sliding_window": True}, "use_sliding_window true"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, 'hidden_act "gelu" (supported: silu)'),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": DROP},
     'rope scaling "dynamic" (supported: none, default, llama3, linear, yarn)'),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 1.0, "attention_factor": 1.5}},
     "rope scaling yarn's attention_factor 1.5 with factor 1.0 (megatron-core's attention factor is 1 for a factor "
     "<= 1: supported: null or 1)"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 2}},
     "rope scaling yarn's beta_fast 1 below its beta_slow 2 (needs beta_fast >= beta_slow)"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "truncate": "yes"}},
     'rope scaling yarn\'s truncate "yes" (needs true, false or null)'),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "mscale": -1}},
     "rope scaling yarn's mscale -1 (needs a number >= 0 or null)"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}},
     "rope scaling yarn's factor null (needs a positive"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "beta_fast": 16},
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_parameters and rope_scaling disagree (yarn with other parameters)"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5"),
    ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0]}, "rope_parameters": DROP},
     'rope scaling "longrope"'),
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}},
     "rope scaling llama3's low_freq_factor null (needs a positive number)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}, "rope_parameters": DROP},
     "rope scaling linear's factor 0 (needs a positive number)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope_parameters and rope_scaling disagree (rope types default and linear)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}, "original_max_position_embeddings": 16,
      "rope_parameters": DROP},
     "original_max_position_embeddings 16 and rope scaling's 32 disagree"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 (must divide num_attention_heads 4)"),
    ({"hidden_size": 30}, "num_attention_heads 4 (must divide hidden_size 30, or head_dim must be set)"),
    ({"num_hidden_layers": "2"}, 'num_hidden_layers "2" (needs a positive integer)'),
    ({"vocab_size": DROP}, "vocab_size null (needs a positive integer)"),
    ({"head_dim": 0}, "head_dim 0 (needs a positive integer or null)"),
])
def test_llama_config_values_that_change_the_math_are_refused_by_name(changes, named):
    message = refusal(convert.model_config_from_hf, "llama", llama_config(**changes), "hf/config.json")
    assert message.startswith("hf/config.json: not supported by the converter: ") and named in message


@pytest.mark.parametrize("changes,named", [
    ({"activation_function": "relu"}, 'activation_function "relu" (supported: gelu_new or gelu_pytorch_tanh or gelu)'),
    ({"scale_attn_weights": False}, "scale_attn_weights false"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx true"),
    ({"add_cross_attention": True}, "add_cross_attention true"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings false"),
    ({"n_head": 5}, "n_head 5 (must divide n_embd 32)"),
    ({"n_layer": 0}, "n_layer 0 (needs a positive integer)"),
])
def test_gpt2_config_values_that_change_the_math_are_refused_by_name(changes, named):
    message = refusal(convert.model_config_from_hf, "gpt2", gpt2_config(**changes), "hf/config.json")
    assert message.startswith("hf/config.json: not supported by the converter: ") and named in message


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("changes,fields", [
    ({"rope_parameters": {"rope_theta": 5e5, **LLAMA3}},  # transformers 5
     {"use_rope_scaling": True, "rope_scaling_factor": 8.0, "rope_scaling_low_freq_factor": 1.0,
      "rope_scaling_high_freq_factor": 4.0, "rope_scaling_original_max_position_embeddings": 32, "rotary_base": 5e5}),
    ({"rope_parameters": DROP, "rope_theta": 5e5, "rope_scaling": {**LLAMA3, "factor": 32.0, "high_freq_factor": 2.0}},
     {"use_rope_scaling": True, "rope_scaling_factor": 32.0, "rope_scaling_high_freq_factor": 2.0}),  # older
    ({"rope_parameters": {"rope_theta": 1e4, **{k: v for k, v in LLAMA3.items()
                                                if k != "original_max_position_embeddings"}}},
     {"rope_scaling_original_max_position_embeddings": 64}),  # transformers 5's fallback: max_position_embeddings
    ({"rope_parameters": {"rope_theta": 1e4, **LLAMA3}, "rope_scaling": dict(LLAMA3)},
     {"use_rope_scaling": True}),  # both, agreeing
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 4}},
     {"use_rope_scaling": False, "rotary_seq_len_interpolation_factor": 4.0}),
    ({"rope_parameters": DROP, "rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rotary_seq_len_interpolation_factor": 2.0}),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": 32}},
     {"position_embedding_type": "yarn", "rotary_scaling_factor": 4.0, "yarn_original_max_position_embeddings": 32,
      "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0,
      "yarn_correction_range_round_to_int": True, "use_rope_scaling": False}),
    ({"rope_parameters": DROP, "rope_theta": 1e4, "rope_scaling": {
        "type": "yarn", "factor": 8, "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.5,
        "truncate": False}},  # older format; original context: transformers 5's fallback, max_position_embeddings
     {"position_embedding_type": "yarn", "rotary_scaling_factor": 8.0, "yarn_original_max_position_embeddings": 64,
      "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0, "mscale": 0.707, "mscale_all_dim": 0.5,
      "yarn_correction_range_round_to_int": False}),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0, "mscale": 0.9}},
     {"mscale": 1.0, "mscale_all_dim": 0.0}),  # transformers ignores mscale without mscale_all_dim
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "attention_factor": 1.0}},
     {"mscale": 0.0, "mscale_all_dim": 0.0}),  # megatron-core's factor: 1 / 1
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "attention_factor": 1.0}},
     {"mscale": 1.0, "mscale_all_dim": 1.0}),  # the factor they give, stated
], ids=["llama3", "llama3-old-format", "llama3-fallback", "llama3-both", "linear", "linear-old-format", "yarn",
        "yarn-old-format", "yarn-mscale-alone", "yarn-attention-factor", "yarn-attention-factor-stated"])
def test_llama3_linear_and_yarn_rope_scaling_are_imported(changes, fields):
    m = convert.model_config_from_hf("llama", llama_config(**changes))
    assert {k: getattr(m, k) for k in fields} == fields
    exported = convert.hf_config_from_args("llama", dataclasses.asdict(m), VOCAB)
    assert convert.model_config_from_hf("llama", exported) == m


def test_every_unsupported_field_is_named_at_once():
    message = refusal(convert.model_config_from_hf, "llama", llama_config(attention_bias=True, sliding_window=128))
    assert "attention_bias true" in message and "sliding_window 128" in message


# -- weights -----------------------------------------------------------------------------


def weights_for(model_type, **changes):
    m = convert.model_config_from_hf(model_type, CONFIGS[model_type](**changes))
    gen = torch.Generator().manual_seed(0)
    shapes = checks.expected_hf_shapes(model_type, m, VOCAB)
    return m, {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_weights_of_the_configured_model_pass(model_type):
    m, weights = weights_for(model_type)
    checks.check_hf_weights(model_type, m, VOCAB, weights, "hf")
    assert len(weights) == (2 + 9 * 2 + 1 if model_type == "llama" else 4 + 12 * 2)


def test_weights_the_mapping_would_drop_are_refused():
    """Qwen2's q/k/v biases in a checkpoint labelled Llama: converting would drop them."""
    m, weights = weights_for("llama")
    for i in range(2):
        for proj in "qkv":
            weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.zeros(32 if proj == "q" else 16)
    message = refusal(checks.check_hf_weights, "llama", m, VOCAB, weights, "hf")
    assert message.startswith("hf: weights the LlamaForCausalLM mapping has no place for (they would be dropped): "
                              "model.layers.0.self_attn.k_proj.bias, model.layers.0.self_attn.q_proj.bias, "
                              "model.layers.0.self_attn.v_proj.bias, model.layers.1.self_attn.k_proj.bias and 2 more")


def test_missing_wrong_shape_and_integer_weights_are_refused():
    m, weights = weights_for("llama")
    del weights["model.layers.1.mlp.down_proj.weight"]
    assert refusal(checks.check_hf_weights, "llama", m, VOCAB, weights, "hf") == \
        "hf: weights config.json implies are missing: model.layers.1.mlp.down_proj.weight"
    m, weights = weights_for("llama")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # as if num_key_value_heads were 4
    assert refusal(checks.check_hf_weights, "llama", m, VOCAB, weights, "hf") == (
        "hf: weight shapes do not match config.json: model.layers.0.self_attn.k_proj.weight [32, 32] "
        "(config.json implies [16, 32])")
    m, weights = weights_for("gpt2")
    weights["h.0.mlp.c_fc.weight"] = torch.zeros(32, 128, dtype=torch.int8)
    assert "weights that are not floating point (quantized?): h.0.mlp.c_fc.weight" in \
        refusal(checks.check_hf_weights, "gpt2", m, VOCAB, weights, "hf")


def test_buffers_and_a_tied_copy_of_the_embedding_pass_but_a_different_head_does_not():
    m, weights = weights_for("llama", tie_word_embeddings=True)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    checks.check_hf_weights("llama", m, VOCAB, weights, "hf")
    weights["lm_head.weight"] = torch.zeros(VOCAB, 32)
    assert "lm_head.weight" in refusal(checks.check_hf_weights, "llama", m, VOCAB, weights, "hf")
    m, weights = weights_for("gpt2")
    prefixed = {"transformer." + k: v for k, v in weights.items()}
    prefixed["transformer.h.0.attn.bias"] = prefixed["transformer.h.0.attn.masked_bias"] = torch.ones(1, 1, 64, 64)
    checks.check_hf_weights("gpt2", m, VOCAB, checks.canonical_names("gpt2", prefixed), "hf")


# -- export ------------------------------------------------------------------------------


def test_a_gpt_model_exported_as_llama_is_refused_naming_what_differs():
    gpt = convert.model_config_from_hf("gpt2", gpt2_config())
    assert refusal(checks.check_exportable, "llama", gpt, "run/iter_0000010") == (
        "run/iter_0000010 holds a model LlamaForCausalLM cannot express: position_embedding_type 'learned_absolute' "
        "(needs 'rope' or 'yarn'); normalization 'LayerNorm' (needs 'RMSNorm'); swiglu False (needs True); "
        "add_bias_linear True (needs False); it is a --model-type gpt2 model")


def test_a_llama_model_exported_as_gpt2_is_refused_naming_what_differs():
    llama = convert.model_config_from_hf("llama", llama_config())
    message = refusal(checks.check_exportable, "gpt2", llama, "run/iter_0000010")
    assert message.startswith("run/iter_0000010 holds a model GPT2LMHeadModel cannot express: "
                              "position_embedding_type 'rope' (needs 'learned_absolute')")
    for named in ("untie_embeddings_and_output_weights True (needs False)",
                  "num_query_groups 2 (GPT-2 has no grouped-query attention: needs 4)"):
        assert named in message
    assert message.endswith("; it is a --model-type llama model")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_what_import_builds_export_expresses(model_type):
    checks.check_exportable(model_type, convert.model_config_from_hf(model_type, CONFIGS[model_type]()), "run")


@pytest.mark.parametrize("model_type,changes,named", [
    ("llama", {"use_rope_scaling": True, "rotary_seq_len_interpolation_factor": 2.0},
     "use_rope_scaling True with rotary_seq_len_interpolation_factor 2 (rope_scaling holds one of them: needs None)"),
    ("llama", {"rotary_percent": 0.5}, "rotary_percent 0.5 (needs 1.0)"),
    ("llama", {"qk_layernorm": True}, "qk_layernorm True (needs False)"),
    ("gpt2", {"kv_channels": 16}, "kv_channels 16 (GPT-2 needs hidden_size / num_attention_heads = 8)"),
])
def test_features_the_target_cannot_express_are_refused(model_type, changes, named):
    m = dataclasses.replace(convert.model_config_from_hf(model_type, CONFIGS[model_type]()), **changes)
    message = refusal(checks.check_exportable, model_type, m, "run")
    assert named in message and message.endswith("; no --model-type can express it")


# -- unreadable inputs -------------------------------------------------------------------


def _hf_dir(tmp_path, config=None):
    from safetensors.torch import save_file

    _, weights = weights_for("llama")
    (tmp_path / "config.json").write_text(json.dumps(config or llama_config()))
    save_file(weights, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_config_json_missing_malformed_or_not_an_object(tmp_path):
    assert refusal(checks.read_hf_config, str(tmp_path)) == (
        f"{tmp_path}/config.json does not exist: --load-dir must be a Hugging Face model directory "
        f"(config.json and the weights)")
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    assert refusal(checks.read_hf_config, str(tmp_path)).startswith(
        f"{tmp_path}/config.json is not valid JSON (Expecting property name")
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "is not a JSON object" in refusal(checks.read_hf_config, str(tmp_path))


def test_truncated_missing_or_corrupt_weight_files(tmp_path):
    hf = _hf_dir(tmp_path)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert refusal(checks.read_hf_weights, str(hf)) == (
        f"{hf}/model.safetensors is truncated or corrupt (Error while deserializing header: incomplete metadata, "
        f"file not fully covered): download it again")
    (hf / "model.safetensors").unlink()
    assert refusal(checks.read_hf_weights, str(hf)) == (
        f"{hf} has no weights: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert refusal(checks.read_hf_weights, str(hf)) == (
        f"{hf}/model.safetensors.index.json names files that are not in {hf}: model-00001-of-00002.safetensors, "
        f"model-00002-of-00002.safetensors: download them")
    (hf / "model.safetensors.index.json").unlink()
    torch.save({"w": torch.ones(3)}, hf / "pytorch_model.bin")
    (hf / "pytorch_model.bin").write_bytes((hf / "pytorch_model.bin").read_bytes()[:100])
    assert refusal(checks.read_hf_weights, str(hf)).startswith(f"{hf}/pytorch_model.bin cannot be read (")


def _main_error(capsys, load_dir, model_type="llama"):
    rc = convert.main(["--model-type", model_type, "--loader", "hf", "--saver", "mcore", "--load-dir", str(load_dir),
                       "--save-dir", str(load_dir) + "_out"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("convert.py: error: "), (rc, err)
    return err.strip().removeprefix("convert.py: error: ")


def test_main_gives_one_line_and_exit_code_2_for_bad_input(tmp_path, capsys):
    absent = tmp_path / "absent"
    assert _main_error(capsys, absent) == f"--load-dir {absent} does not exist or is not a directory"
    (tmp_path / "hf").mkdir()
    hf = _hf_dir(tmp_path / "hf")
    (hf / "config.json").write_text("{")
    assert _main_error(capsys, hf).startswith(f"{hf}/config.json is not valid JSON")
    (hf / "config.json").write_text(json.dumps(llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2")))
    assert _main_error(capsys, hf).startswith(f"{hf}/config.json says Qwen2ForCausalLM (model_type qwen2)")
    (hf / "config.json").write_text(json.dumps(llama_config(num_key_value_heads=4)))
    assert _main_error(capsys, hf).startswith(f"{hf}: weight shapes do not match config.json: "
                                              f"model.layers.0.self_attn.k_proj.weight [16, 32]")
    (hf / "config.json").write_text(json.dumps(llama_config()))
    (hf / "model.safetensors").write_bytes(b"\x10\x00")
    assert _main_error(capsys, hf) == (f"{hf}/model.safetensors is truncated or corrupt (Error while deserializing "
                                       f"header: header too small): download it again")
    assert not (tmp_path / "hf_out").exists()
