"""What the Hugging Face <-> megatron converter refuses, and reading its input.

Nothing is converted approximately: a config.json of another architecture, a config value
that changes the computation in a way the mapping does not carry, a weight with no place in
the mapping (or missing, or of the wrong shape), and an export the target class cannot
express are refused by name (:class:`ConversionError`: one line, exit code 2). Used by
``convert.py``, which holds the mapping itself.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import torch

MODEL_TYPES = ("llama", "gpt2")


# The Hugging Face class and config model_type each --model-type converts.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "gpt2": ("GPT2LMHeadModel", "gpt2")}


# GPT-2 activations and our --openai-gelu for each (gelu_new is the tanh approximation).
GPT2_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


class ConversionError(Exception):
    """An input the converter cannot convert faithfully: :func:`main` prints it as one line, exit code 2."""


def read_hf_config(directory: str) -> dict:
    """The config.json of the Hugging Face model in ``directory``."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist: --load-dir must be a Hugging Face model directory "
                              f"(config.json and the weights)") from None
    except OSError as e:
        raise ConversionError(f"{path} cannot be read ({e.strerror})") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise ConversionError(f"{path} is not valid JSON ({e}): replace it with the model's config.json") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object: replace it with the model's config.json")
    return config


def _rope_settings(c: dict) -> list:
    """RoPE settings: ``rope_parameters`` (transformers 5) and ``rope_scaling`` (older), each a dict."""
    values = [c.get(key) for key in ("rope_parameters", "rope_scaling")]
    return [v if isinstance(v, dict) else {"rope_type": v} for v in values if v is not None]


# The RoPE scalings the converter carries (Hugging Face rope_type: the parameters it needs) and
# where each lives in our model: llama3 -> --use-rope-scaling and --rope-scaling-*, linear ->
# --rotary-seq-len-interpolation-factor, yarn -> --position-embedding-type yarn with
# --rotary-scaling-factor, --yarn-*, --mscale and --mscale-all-dim. Others (dynamic, longrope, ...)
# are refused.
ROPE_SCALINGS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings")}
# Their optional parameters (transformers' defaults apply when absent)
_OPTIONAL = {"yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")}


def _rope_type(r: dict):
    return r.get("rope_type", r.get("type"))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """The factor megatron-core's attention scales YaRN's cos and sin by, computed as its
    ``_yarn_get_concentration_factor`` computes it: (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim
    ln(factor) + 1), 1 for a factor <= 1. transformers computes the same from non-zero mscale and
    mscale_all_dim when config.json gives no attention_factor."""
    def scaled(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    return float(scaled(mscale) / scaled(mscale_all_dim))


def _mscales_for(attention_factor: float, factor: float):
    """(mscale, mscale_all_dim), one of them 0, for which megatron-core's attention factor is
    ``attention_factor`` to 12 digits (the closest; of equals, the one rounded to 12 digits), or None
    (a factor <= 1 gives 1)."""
    if factor <= 1:
        return None
    if attention_factor >= 1:
        m = (attention_factor - 1) / (0.1 * math.log(factor))
        candidates = [(float(f"{m:.12g}"), 0.0), (m, 0.0)]
    else:
        m = (1 / attention_factor - 1) / (0.1 * math.log(factor))
        candidates = [(0.0, float(f"{m:.12g}")), (0.0, m)]
    best = min(candidates, key=lambda c: abs(yarn_attention_factor(factor, *c) - attention_factor))
    return best if math.isclose(yarn_attention_factor(factor, *best), attention_factor, rel_tol=1e-12) else None


def _yarn(values: dict, problems: list) -> dict:
    """transformers' YaRN parameters as our model takes them (problems added to ``problems``):
    transformers' defaults filled in (beta_fast 32, beta_slow 1, truncate true), and its attention
    factor as the (mscale, mscale_all_dim) from which megatron-core computes it. transformers takes
    an attention_factor as given; else it uses mscale and mscale_all_dim when both are non-zero
    (ours: the same), else 0.1 ln(factor) + 1 (ours: 1 and 0, the defaults). A given
    attention_factor other than those becomes mscale (above 1) or mscale_all_dim (below 1), the
    other 0, reproducing it to 12 digits."""
    out = {k: values[k] for k in ROPE_SCALINGS["yarn"]}
    for key, default in (("beta_fast", 32), ("beta_slow", 1)):
        v = values.get(key)
        if v is not None and not (_number(v) and v >= 0):
            problems.append(f"rope scaling yarn's {key} {json.dumps(v)} (needs a positive number)")
        out[key] = float(v or default) if _number(v) or v is None else None
    if out["beta_fast"] is not None and out["beta_slow"] is not None and out["beta_fast"] < out["beta_slow"]:
        problems.append(f"rope scaling yarn's beta_fast {out['beta_fast']:g} below its beta_slow "
                        f"{out['beta_slow']:g} (needs beta_fast >= beta_slow)")
    for key in ("mscale", "mscale_all_dim"):
        v = values.get(key)
        if v is not None and not (_number(v) and v >= 0):
            problems.append(f"rope scaling yarn's {key} {json.dumps(v)} (needs a number >= 0 or null)")
    given = values.get("attention_factor")
    if given is not None and not (_number(given) and given > 0):
        problems.append(f"rope scaling yarn's attention_factor {json.dumps(given)} (needs a positive number or null)")
    truncate = values.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        problems.append(f"rope scaling yarn's truncate {json.dumps(truncate)} (needs true, false or null)")
    out["truncate"] = truncate is not False
    mscale, mscale_all_dim = values.get("mscale"), values.get("mscale_all_dim")
    both = _number(mscale) and _number(mscale_all_dim) and mscale and mscale_all_dim
    out["mscale"], out["mscale_all_dim"] = (float(mscale), float(mscale_all_dim)) if both else (1.0, 0.0)
    factor = out["factor"]
    if _number(given) and given > 0 and _number(factor) and factor > 0 and not math.isclose(
            given, yarn_attention_factor(float(factor), out["mscale"], out["mscale_all_dim"]), rel_tol=1e-12):
        mscales = _mscales_for(float(given), float(factor))
        if mscales is None:
            problems.append(f"rope scaling yarn's attention_factor {json.dumps(given)} with factor "
                            f"{json.dumps(factor)} (megatron-core's attention factor is 1 for a factor <= 1: "
                            f"supported: null or 1)")
        else:
            out["mscale"], out["mscale_all_dim"] = mscales
    return out


def rope_scaling(c: dict):
    """(the RoPE scaling ``c`` asks for as {rope_type, its parameters} or None, the problems).

    llama3's and yarn's ``original_max_position_embeddings`` may also be a top-level field
    (transformers 5 prefers it there) or, missing in both places, ``max_position_embeddings``
    (transformers 5's fallback). yarn's parameters are those our model takes (:func:`_yarn`)."""
    settings = _rope_settings(c)
    types = sorted({str(_rope_type(r) or "default") for r in settings})
    if len(types) > 1:
        return None, [f"rope_parameters and rope_scaling disagree (rope types {' and '.join(types)})"]
    if types in ([], ["default"]):
        return None, []
    r, rope_type = settings[0], _rope_type(settings[0])
    if rope_type not in ROPE_SCALINGS:  # dynamic, longrope, ...
        return None, [f"rope scaling {json.dumps(rope_type)} (supported: none, default, "
                      f"{', '.join(ROPE_SCALINGS)})"]
    keys = ROPE_SCALINGS[rope_type]
    problems = []
    if any(other.get(k) != r.get(k) for other in settings[1:] for k in keys + _OPTIONAL.get(rope_type, ())):
        problems.append(f"rope_parameters and rope_scaling disagree ({rope_type} with other parameters)")
    values = {k: r.get(k) for k in keys}
    if "original_max_position_embeddings" in keys:
        top, nested = c.get("original_max_position_embeddings"), values["original_max_position_embeddings"]
        if top is not None and nested is not None and top != nested:
            problems.append(f"original_max_position_embeddings {json.dumps(top)} and rope scaling's "
                            f"{json.dumps(nested)} disagree")
        values["original_max_position_embeddings"] = next(
            (v for v in (top, nested, c.get("max_position_embeddings")) if v is not None), None)
    for key, v in values.items():
        if not _number(v) or v <= 0:
            problems.append(f"rope scaling {rope_type}'s {key} {json.dumps(v)} (needs a positive number)")
    if rope_type == "yarn":
        values = _yarn({**values, **{k: r.get(k) for k in _OPTIONAL["yarn"]}}, problems)
    return {"rope_type": rope_type, **values}, problems


def rope_theta(config: dict) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def check_architecture(model_type: str, c: dict, where: str) -> None:
    arch, name = ARCHITECTURES[model_type]
    archs, named = c.get("architectures") or [], c.get("model_type")
    archs = archs if isinstance(archs, list) else [archs]
    if (archs == [arch] and named in (name, None)) or (not archs and named == name):
        return
    said = (", ".join(map(str, archs)) if archs else "no architectures") + f" (model_type {named})"
    supported = " and ".join(f"{a} (--model-type {t})" for t, (a, _) in ARCHITECTURES.items())
    other = [t for t, (a, n) in ARCHITECTURES.items() if t != model_type and (archs == [a] or named == n)]
    hint = f"; pass --model-type {other[0]}" if other else ""
    raise ConversionError(f"{where} says {said}; the converter supports {supported}{hint}")


# config.json sizes each model type needs (positive integers), and those it may have
_SIZES = {"llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
          "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head")}


_OPTIONAL_SIZES = {"llama": ("num_key_value_heads", "head_dim", "max_position_embeddings"),
                   "gpt2": ("n_inner", "n_positions")}


def hf_config_problems(model_type: str, c: dict) -> list:
    """What in the config.json ``c`` (of the right architecture) the converter cannot carry over
    exactly: missing or malformed sizes, and fields whose values change the computation in a way
    our model does not (each named with the value it supports). Empty when it converts exactly.

    Fields that do not change the result are not looked at: dropout (off for conversion),
    ``pretraining_tp`` (a split of the same matrix products), GPT-2's ``reorder_and_upcast_attn``
    (the same attention in float32), token ids, ``use_cache``, ``torch_dtype``."""
    problems = []

    def refuse(field, supported):
        shown = json.dumps(c.get(field))
        problems.append(f"{field} {shown if len(shown) <= 60 else shown[:57] + '...'} (supported: {supported})")

    for field in _SIZES[model_type]:
        v = c.get(field)
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            problems.append(f"{field} {json.dumps(v)} (needs a positive integer)")
    for field in _OPTIONAL_SIZES[model_type]:
        v = c.get(field)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            problems.append(f"{field} {json.dumps(v)} (needs a positive integer or null)")
    if problems:
        return problems
    # fields of related architectures that would change attention, should a config carry them
    if c.get("sliding_window") is not None:
        refuse("sliding_window", "null: full causal attention")
    if c.get("use_sliding_window"):
        refuse("use_sliding_window", "false")
    if any(t != "full_attention" for t in c.get("layer_types") or []):
        refuse("layer_types", "full_attention in every layer")
    if c.get("quantization_config") is not None:
        refuse("quantization_config", "none: unquantized weights")
    rope = _rope_settings(c)
    for partial in [c.get("partial_rotary_factor")] + [r.get("partial_rotary_factor") for r in rope]:
        if partial not in (None, 1, 1.0):
            problems.append(f"partial_rotary_factor {json.dumps(partial)} (supported: 1.0)")
    if model_type == "llama":
        if c.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "silu")
        for field in ("attention_bias", "mlp_bias"):
            if c.get(field):
                refuse(field, "false: the converted layers have no biases")
        problems += rope_scaling(c)[1]
        heads, groups = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        if heads % groups:
            problems.append(f"num_key_value_heads {groups} (must divide num_attention_heads {heads})")
        if not c.get("head_dim") and c["hidden_size"] % heads:
            problems.append(f"num_attention_heads {heads} (must divide hidden_size {c['hidden_size']}, "
                            f"or head_dim must be set)")
        return problems
    if c.get("activation_function", "gelu_new") not in GPT2_ACTIVATIONS:
        refuse("activation_function", " or ".join(GPT2_ACTIVATIONS))
    if not c.get("scale_attn_weights", True):
        refuse("scale_attn_weights", "true")
    for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c.get(field):
            refuse(field, "false")
    if not c.get("tie_word_embeddings", True):
        refuse("tie_word_embeddings", "true: GPT2LMHeadModel's lm_head is wte")
    if c["n_embd"] % c["n_head"]:
        problems.append(f"n_head {c['n_head']} (must divide n_embd {c['n_embd']})")
    return problems


# What our model must be for each Hugging Face class to express it (ModelConfig field: value, or a
# tuple of the values it may have).
_EXPRESSIBLE = {
    "llama": {"position_embedding_type": ("rope", "yarn"), "normalization": "RMSNorm", "swiglu": True,
              "add_bias_linear": False, "qk_layernorm": False, "rotary_percent": 1.0},
    "gpt2": {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "swiglu": False,
             "add_bias_linear": True, "qk_layernorm": False, "untie_embeddings_and_output_weights": False},
}


def export_problems(model_type: str, m) -> list:
    """What of our model ``m`` (a ModelConfig) the Hugging Face class of ``model_type`` cannot express;
    empty when the export computes exactly what ``m`` does."""
    problems = [f"{field} {getattr(m, field)!r} (needs {' or '.join(map(repr, allowed))})"
                for field, value in _EXPRESSIBLE[model_type].items()
                for allowed in [value if isinstance(value, tuple) else (value,)] if getattr(m, field) not in allowed]
    if model_type == "llama" and m.use_rope_scaling and m.rotary_seq_len_interpolation_factor is not None:
        problems.append(f"use_rope_scaling True with rotary_seq_len_interpolation_factor "
                        f"{m.rotary_seq_len_interpolation_factor:g} (rope_scaling holds one of them: needs None)")
    if model_type == "gpt2":
        if m.num_query_groups != m.num_attention_heads:
            problems.append(f"num_query_groups {m.num_query_groups} (GPT-2 has no grouped-query attention: needs "
                            f"{m.num_attention_heads})")
        if m.kv_channels * m.num_attention_heads != m.hidden_size:
            problems.append(f"kv_channels {m.kv_channels} (GPT-2 needs hidden_size / num_attention_heads = "
                            f"{m.hidden_size // m.num_attention_heads})")
    return problems


def check_exportable(model_type: str, m, where: str) -> None:
    problems = export_problems(model_type, m)
    if not problems:
        return
    fits = [t for t in MODEL_TYPES if t != model_type and not export_problems(t, m)]
    hint = f"; it is a --model-type {fits[0]} model" if fits else "; no --model-type can express it"
    raise ConversionError(f"{where} holds a model {ARCHITECTURES[model_type][0]} cannot express: "
                          + "; ".join(problems) + hint)


def expected_hf_shapes(model_type: str, m, vocab: int) -> dict:
    """{Hugging Face weight name: shape} of the model ``m`` (a ModelConfig) describes; GPT-2 names
    without the ``transformer.`` prefix (see :func:`canonical_names`)."""
    h, ffn, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    if model_type == "llama":
        shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
        for i in range(m.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn)})
        if m.untie_embeddings_and_output_weights:
            shapes["lm_head.weight"] = (vocab, h)
        return shapes
    shapes = {"wte.weight": (vocab, h), "wpe.weight": (m.max_position_embeddings, h), "ln_f.weight": (h,),
              "ln_f.bias": (h,)}
    for i in range(m.num_layers):  # Conv1D weights are [in, out]
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
            p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
            p + "mlp.c_fc.weight": (h, ffn), p + "mlp.c_fc.bias": (ffn,),
            p + "mlp.c_proj.weight": (ffn, h), p + "mlp.c_proj.bias": (h,)})
    return shapes


# Buffers some checkpoints carry that hold no weights: the rotary frequencies of older Llama
# exports, GPT-2's causal-mask buffers.
_NOT_WEIGHTS = {"llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
                "gpt2": re.compile(r"h\.\d+\.attn\.(masked_)?bias")}


_EMBEDDING = {"llama": "model.embed_tokens.weight", "gpt2": "wte.weight"}


def canonical_names(model_type: str, weights: dict) -> dict:
    """GPT-2 checkpoints name their weights with or without the ``transformer.`` prefix: without."""
    if model_type != "gpt2":
        return weights
    return {k.removeprefix("transformer."): v for k, v in weights.items()}


def _some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_hf_weights(model_type: str, m, vocab: int, weights: dict, where: str) -> None:
    """Refuse weights that are not exactly those of the model ``m`` describes: any the mapping would
    drop (q/k/v biases of a Qwen2 checkpoint, say), any missing, any of another shape or not floating point."""
    expected = expected_hf_shapes(model_type, m, vocab)
    tied = model_type == "gpt2" or not m.untie_embeddings_and_output_weights
    embedding = weights.get(_EMBEDDING[model_type])

    def droppable(name):
        if _NOT_WEIGHTS[model_type].fullmatch(name):
            return True  # a copy of the tied embedding is no information either
        return name == "lm_head.weight" and tied and embedding is not None and torch.equal(weights[name], embedding)

    unknown = [n for n in weights if n not in expected and not droppable(n)]
    if unknown:
        raise ConversionError(f"{where}: weights the {ARCHITECTURES[model_type][0]} mapping has no place for (they "
                              f"would be dropped): {_some(unknown)}; this is another architecture or a variant the "
                              f"converter does not support")
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ConversionError(f"{where}: weights config.json implies are missing: {_some(missing)}")
    wrong = [f"{n} {list(weights[n].shape)} (config.json implies {list(s)})" for n, s in expected.items()
             if tuple(weights[n].shape) != s]
    if wrong:
        raise ConversionError(f"{where}: weight shapes do not match config.json: {_some(wrong)}")
    integral = [n for n in expected if not weights[n].is_floating_point()]
    if integral:
        raise ConversionError(f"{where}: weights that are not floating point (quantized?): {_some(integral)}")


def _load_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist: download the missing file") from None
    except (OSError, SafetensorError) as e:
        raise ConversionError(f"{path} is truncated or corrupt ({e}): download it again") from None


def hf_weight_files(directory: str) -> list:
    """The weight files of a Hugging Face folder, in reading order: the shards its safetensors index
    names, its model.safetensors, or its pytorch_model*.bin files."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index} is not a safetensors index ({type(e).__name__}: {e}): download it "
                                  f"again") from None
        absent = [name for name in files if not os.path.exists(os.path.join(directory, name))]
        if absent:
            raise ConversionError(f"{index} names files that are not in {directory}: {_some(absent)}: download them")
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if not bins:
        raise ConversionError(f"{directory} has no weights: no model.safetensors, model.safetensors.index.json or "
                              f"pytorch_model*.bin")
    return bins


def read_hf_weight_file(path: str) -> dict:
    """The tensors of one file :func:`hf_weight_files` names."""
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's errors for a bad file are many (pickle, zip, EOF)
        raise ConversionError(f"{path} cannot be read ({type(e).__name__}: {e}): download it again") from None


def read_hf_weights(directory: str) -> dict:
    return {k: v for path in hf_weight_files(directory) for k, v in read_hf_weight_file(path).items()}
