#!/usr/bin/env python
"""Convert between Hugging Face checkpoints and this project's (megatron-core) checkpoints.

    # Hugging Face -> megatron-core (weights only; load with --load, any TP / FPDT layout)
    python tools/checkpoint/convert.py --model-type llama --loader hf --saver mcore \\
        --load-dir /models/Llama-3-8B --save-dir ckpt/llama3_8b
    # megatron-core -> Hugging Face (newest usable checkpoint in --load-dir, any layout it was saved with)
    python tools/checkpoint/convert.py --model-type llama --loader mcore --saver hf \\
        --load-dir runs/llama3_8b --save-dir hf/llama3_8b_trained

Model types: ``llama`` (LlamaForCausalLM: RMSNorm, SwiGLU, RoPE with its base, GQA, any head
dimension, tied or untied embeddings) and ``gpt2`` (GPT2LMHeadModel: LayerNorm, tanh or exact
GeLU, biases, learned positions, tied embeddings). Hugging Face weights are read from
safetensors (single file or sharded with an index) or pytorch_model.bin and written as
model.safetensors with a config.json. Runs in one process on the CPU; megatron-core's
distributed checkpoints reshard on load, so one converted checkpoint serves every parallel layout.

Nothing is converted approximately. A config.json of another architecture (Qwen2, Mistral, ...),
a config field with a value that changes the computation in a way the mapping does not carry
(biases, a sliding window, scaled RoPE, another activation, ...), a weight with no place in the
mapping, a missing weight or one of the wrong shape is refused by name; so is a checkpoint of
ours whose model the requested Hugging Face class cannot express (a GPT model exported as
Llama). Input errors are one line and exit code 2.

The mapping, both ways (megatron-core local-spec names):
    embed_tokens / wte            embedding.word_embeddings.weight (rows padded to the padded vocab)
    wpe                           embedding.position_embeddings.weight            (gpt2)
    q,k,v (llama) / c_attn (gpt2) self_attention.linear_qkv: per query group [q heads, k, v]
    o_proj / attn.c_proj          self_attention.linear_proj
    gate_proj,up_proj / mlp.c_fc  mlp.linear_fc1 ([gate; up] for SwiGLU)
    down_proj / mlp.c_proj        mlp.linear_fc2
    norms                         input_layernorm, pre_mlp_layernorm, decoder.final_layernorm
    lm_head (untied)              output_layer.weight
GPT-2's Conv1D weights are stored transposed ([in, out]); they are transposed on the way.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

MODEL_TYPES = ("llama", "gpt2")
# The Hugging Face class and config model_type each --model-type converts.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "gpt2": ("GPT2LMHeadModel", "gpt2")}
# GPT-2 activations and our --openai-gelu for each (gelu_new is the tanh approximation).
GPT2_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


class ConversionError(Exception):
    """An input the converter cannot convert faithfully: :func:`main` prints it as one line, exit code 2."""


# -- configs -----------------------------------------------------------------------------


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


def _rope_theta(config: dict) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _check_architecture(model_type: str, c: dict, where: str) -> None:
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
        for rope_type in sorted({r.get("rope_type", r.get("type")) for r in rope} - {"default", None}, key=str):
            # llama3, linear, dynamic, yarn, ...
            problems.append(f"rope scaling {json.dumps(rope_type)} (supported: none, rope_type default)")
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


def _vocab_multiple(vocab: int) -> int:
    """The largest power of two up to 128 that divides the vocabulary: no padded rows at TP 1, so the
    softmax runs over exactly the model's tokens (padded logits would be 0, not -inf)."""
    return next(m for m in (128, 64, 32, 16, 8, 4, 2, 1) if vocab % m == 0)


def model_config_from_hf(model_type: str, c: dict, where: str = "config.json"):
    """Our :class:`~megatron.training.config.ModelConfig` for the model a Hugging Face config.json
    describes; raises ConversionError, naming the fields, for anything it cannot describe exactly."""
    from megatron.training.config import ModelConfig

    _check_architecture(model_type, c, where)
    problems = hf_config_problems(model_type, c)
    if problems:
        raise ConversionError(f"{where}: not supported by the converter: " + "; ".join(problems))
    common = dict(attention_dropout=0.0, hidden_dropout=0.0, make_vocab_size_divisible_by=_vocab_multiple(c["vocab_size"]))
    try:
        if model_type == "llama":
            heads = c["num_attention_heads"]
            return ModelConfig(
                num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
                num_attention_heads=heads, kv_channels=c.get("head_dim") or c["hidden_size"] // heads,
                num_query_groups=c.get("num_key_value_heads") or heads, normalization="RMSNorm",
                norm_epsilon=c.get("rms_norm_eps", 1e-6), swiglu=True, add_bias_linear=False,
                position_embedding_type="rope", rotary_base=_rope_theta(c),
                max_position_embeddings=c.get("max_position_embeddings") or 4096,
                untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False), **common)
        return ModelConfig(
            num_layers=c["n_layer"], hidden_size=c["n_embd"], ffn_hidden_size=c.get("n_inner") or 4 * c["n_embd"],
            num_attention_heads=c["n_head"], normalization="LayerNorm", norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
            openai_gelu=GPT2_ACTIVATIONS[c.get("activation_function", "gelu_new")],
            position_embedding_type="learned_absolute", max_position_embeddings=c.get("n_positions") or 1024,
            **common)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def hf_config_from_args(model_type: str, a: dict, vocab: int) -> dict:
    """A Hugging Face config.json for the model our arguments describe (checked by :func:`export_problems`)."""
    if model_type == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
                "hidden_size": a["hidden_size"], "intermediate_size": a["ffn_hidden_size"],
                "num_hidden_layers": a["num_layers"], "num_attention_heads": a["num_attention_heads"],
                "num_key_value_heads": a["num_query_groups"], "head_dim": a["kv_channels"],
                "rms_norm_eps": a["norm_epsilon"], "rope_theta": float(a["rotary_base"]),
                "max_position_embeddings": a["max_position_embeddings"], "hidden_act": "silu",
                "tie_word_embeddings": not a["untie_embeddings_and_output_weights"],
                "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_embd": a["hidden_size"], "n_layer": a["num_layers"], "n_head": a["num_attention_heads"],
            "n_inner": a["ffn_hidden_size"], "n_positions": a["max_position_embeddings"],
            "layer_norm_epsilon": a["norm_epsilon"], "activation_function": "gelu_new" if a["openai_gelu"] else "gelu",
            "tie_word_embeddings": True, "torch_dtype": "float32"}


# What our model must be for each Hugging Face class to express it (ModelConfig field: value).
_EXPRESSIBLE = {
    "llama": {"position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False,
              "qk_layernorm": False, "rotary_percent": 1.0, "use_rope_scaling": False},
    "gpt2": {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "swiglu": False,
             "add_bias_linear": True, "qk_layernorm": False, "untie_embeddings_and_output_weights": False},
}


def export_problems(model_type: str, m) -> list:
    """What of our model ``m`` (a ModelConfig) the Hugging Face class of ``model_type`` cannot express;
    empty when the export computes exactly what ``m`` does."""
    problems = [f"{field} {getattr(m, field)!r} (needs {value!r})" for field, value in _EXPRESSIBLE[model_type].items()
                if getattr(m, field) != value]
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


# -- weights -----------------------------------------------------------------------------


def _qkv_to_megatron(q, k, v, heads, groups):
    """[heads*d, ...], [groups*d, ...] x2 -> per query group [q heads of the group, k, v]."""
    d = q.shape[0] // heads
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups, d, *tail)
    k = k.reshape(groups, 1, d, *tail)
    v = v.reshape(groups, 1, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_from_megatron(qkv, heads, groups):
    per = heads // groups
    d = qkv.shape[0] // (groups * (per + 2))
    tail = qkv.shape[1:]
    x = qkv.reshape(groups, per + 2, d, *tail)
    return (x[:, :per].reshape(heads * d, *tail), x[:, per].reshape(groups * d, *tail),
            x[:, per + 1].reshape(groups * d, *tail))


def _pad_rows(weight, rows):
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def hf_to_megatron(model_type, hf, a, padded_vocab):
    heads, groups = a["num_attention_heads"], a["num_query_groups"]
    out = {}
    if model_type == "llama":
        g = lambda name: hf[f"model.{name}"]  # noqa: E731
        out["embedding.word_embeddings.weight"] = _pad_rows(g("embed_tokens.weight"), padded_vocab)
        for i in range(a["num_layers"]):
            p, m = f"layers.{i}.", f"decoder.layers.{i}."
            out[m + "input_layernorm.weight"] = g(p + "input_layernorm.weight")
            out[m + "self_attention.linear_qkv.weight"] = _qkv_to_megatron(
                g(p + "self_attn.q_proj.weight"), g(p + "self_attn.k_proj.weight"), g(p + "self_attn.v_proj.weight"),
                heads, groups)
            out[m + "self_attention.linear_proj.weight"] = g(p + "self_attn.o_proj.weight")
            out[m + "pre_mlp_layernorm.weight"] = g(p + "post_attention_layernorm.weight")
            out[m + "mlp.linear_fc1.weight"] = torch.cat([g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = g(p + "mlp.down_proj.weight")
        out["decoder.final_layernorm.weight"] = g("norm.weight")
        if a["untie_embeddings_and_output_weights"]:
            out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], padded_vocab)
        return out
    g = hf.__getitem__  # names from canonical_names
    out["embedding.word_embeddings.weight"] = _pad_rows(g("wte.weight"), padded_vocab)
    out["embedding.position_embeddings.weight"] = g("wpe.weight")
    for i in range(a["num_layers"]):
        p, m = f"h.{i}.", f"decoder.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[m + ours + ".weight"], out[m + ours + ".bias"] = g(p + theirs + ".weight"), g(p + theirs + ".bias")
        w, b = g(p + "attn.c_attn.weight").t(), g(p + "attn.c_attn.bias")  # Conv1D: [in, out]
        out[m + "self_attention.linear_qkv.weight"] = _qkv_to_megatron(*w.chunk(3), heads, heads)
        out[m + "self_attention.linear_qkv.bias"] = _qkv_to_megatron(*b.chunk(3), heads, heads)
        out[m + "self_attention.linear_proj.weight"] = g(p + "attn.c_proj.weight").t()
        out[m + "self_attention.linear_proj.bias"] = g(p + "attn.c_proj.bias")
        out[m + "mlp.linear_fc1.weight"], out[m + "mlp.linear_fc1.bias"] = g(p + "mlp.c_fc.weight").t(), g(p + "mlp.c_fc.bias")
        out[m + "mlp.linear_fc2.weight"] = g(p + "mlp.c_proj.weight").t()
        out[m + "mlp.linear_fc2.bias"] = g(p + "mlp.c_proj.bias")
    out["decoder.final_layernorm.weight"], out["decoder.final_layernorm.bias"] = g("ln_f.weight"), g("ln_f.bias")
    return {k: v.contiguous() for k, v in out.items()}


def megatron_to_hf(model_type, sd, a, vocab):
    heads, groups = a["num_attention_heads"], a["num_query_groups"]
    out = {}
    if model_type == "llama":
        out["model.embed_tokens.weight"] = sd["embedding.word_embeddings.weight"][:vocab]
        for i in range(a["num_layers"]):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            out[p + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
            q, k, v = _qkv_from_megatron(sd[m + "self_attention.linear_qkv.weight"], heads, groups)
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
            out[p + "self_attn.v_proj.weight"] = v
            out[p + "self_attn.o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
            out[p + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
            gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
        out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
        if a["untie_embeddings_and_output_weights"]:
            out["lm_head.weight"] = sd["output_layer.weight"][:vocab]
    else:
        out["transformer.wte.weight"] = sd["embedding.word_embeddings.weight"][:vocab]
        out["transformer.wpe.weight"] = sd["embedding.position_embeddings.weight"]
        for i in range(a["num_layers"]):
            p, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[p + theirs + ".weight"], out[p + theirs + ".bias"] = sd[m + ours + ".weight"], sd[m + ours + ".bias"]
            w = torch.cat(_qkv_from_megatron(sd[m + "self_attention.linear_qkv.weight"], heads, heads))
            b = torch.cat(_qkv_from_megatron(sd[m + "self_attention.linear_qkv.bias"], heads, heads))
            out[p + "attn.c_attn.weight"], out[p + "attn.c_attn.bias"] = w.t(), b
            out[p + "attn.c_proj.weight"] = sd[m + "self_attention.linear_proj.weight"].t()
            out[p + "attn.c_proj.bias"] = sd[m + "self_attention.linear_proj.bias"]
            out[p + "mlp.c_fc.weight"] = sd[m + "mlp.linear_fc1.weight"].t()
            out[p + "mlp.c_fc.bias"] = sd[m + "mlp.linear_fc1.bias"]
            out[p + "mlp.c_proj.weight"] = sd[m + "mlp.linear_fc2.weight"].t()
            out[p + "mlp.c_proj.bias"] = sd[m + "mlp.linear_fc2.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["decoder.final_layernorm.weight"], \
            sd["decoder.final_layernorm.bias"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


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


def read_hf_weights(directory: str) -> dict:
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
        return {k: v for name in files for k, v in _load_safetensors(os.path.join(directory, name)).items()}
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return _load_safetensors(single)
    bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    weights = {}
    for b in bins:
        try:
            weights.update(torch.load(b, map_location="cpu", weights_only=True))
        except Exception as e:  # torch.load's errors for a bad file are many (pickle, zip, EOF)
            raise ConversionError(f"{b} cannot be read ({type(e).__name__}: {e}): download it again") from None
    if not bins:
        raise ConversionError(f"{directory} has no weights: no model.safetensors, model.safetensors.index.json or "
                              f"pytorch_model*.bin")
    return weights


# -- the two directions ------------------------------------------------------------------


def _single_process_model(model, vocab_size: int, padded_vocab=None):
    """Our model (baseline spec, TP 1) for ``model`` (a ModelConfig) in a world of one process,
    with ``padded_vocab`` rows (a checkpoint's) or Megatron's padding at TP 1: (the run config,
    the model, the padded vocabulary size)."""
    from megatron.training.config import DataConfig, RunConfig, TokenizerConfig, TrainingConfig
    from megatron.training.initialize import initialize
    from megatron.training.models import build_model, padded_vocab_size

    config = RunConfig(model=model, training=TrainingConfig(seq_length=model.max_position_embeddings, train_iters=1),
                       data=DataConfig(mock_data=True),
                       tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=vocab_size))
    padded = padded_vocab or padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by, 1)
    return config, build_model(config, initialize(config), vocab_size, padded_vocab=padded), padded


def hf_to_mcore(model_type, load_dir, save_dir):
    from megatron.training.checkpointing import model_args_dict, write_checkpoint

    hf_config = read_hf_config(load_dir)
    model_config = model_config_from_hf(model_type, hf_config, os.path.join(load_dir, "config.json"))
    vocab = hf_config["vocab_size"]
    weights = canonical_names(model_type, read_hf_weights(load_dir))
    check_hf_weights(model_type, model_config, vocab, weights, load_dir)
    config, model, padded = _single_process_model(model_config, vocab)
    state = hf_to_megatron(model_type, {k: v.float() for k, v in weights.items()}, dataclasses.asdict(model_config),
                           padded)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:  # the mapping and our model disagree: a bug here, not in the input
        raise RuntimeError(f"converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return write_checkpoint(save_dir, 0, {"model": model.sharded_state_dict(), "kind": "weights",
                                          "model_args": model_args_dict(config), "true_vocab_size": vocab,
                                          "padded_vocab_size": padded}, {})


def mcore_to_hf(model_type, load_dir, save_dir):
    import torch.distributed as dist

    from fpdt_ext.runtime import init_distributed

    init_distributed()
    try:
        return _mcore_to_hf(model_type, load_dir, save_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _mcore_to_hf(model_type, load_dir, save_dir):
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from megatron.training.checkpointing import model_config_from_args, newest_usable_checkpoint, saved_padded_vocab

    path, reasons = newest_usable_checkpoint(load_dir)
    if path is None:
        raise ConversionError(f"--load-dir {load_dir} holds no usable checkpoint ("
                              + ("; ".join(reasons) or "no iter_* directory") + ")")
    common = dist_checkpointing.load_common_state_dict(path)
    a = common.get("model_args") if isinstance(common, dict) else None
    if not isinstance(a, dict):
        raise ConversionError(f"{path} has no model arguments: not a checkpoint written by this project")
    try:
        model_config = model_config_from_args(a)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: its model arguments do not describe a model ({e})") from None
    check_exportable(model_type, model_config, path)
    vocab = common.get("true_vocab_size") or a["vocab_size"]
    _, model, _ = _single_process_model(model_config, vocab, saved_padded_vocab(common))  # every saved row
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"]
    model.load_state_dict(loaded)
    fields = dataclasses.asdict(model_config)
    hf = megatron_to_hf(model_type, {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
                        fields, vocab)
    try:
        os.makedirs(save_dir, exist_ok=True)
        save_file(hf, os.path.join(save_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(save_dir, "config.json"), "w") as f:
            json.dump(hf_config_from_args(model_type, fields, vocab), f, indent=1)
    except OSError as e:
        raise ConversionError(f"--save-dir {save_dir} cannot be written ({e.strerror or e})") from None
    return save_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", choices=MODEL_TYPES, required=True)
    parser.add_argument("--loader", choices=["hf", "mcore"], required=True, help="format of --load-dir")
    parser.add_argument("--saver", choices=["hf", "mcore"], required=True, help="format to write to --save-dir")
    parser.add_argument("--load-dir", required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="--saver mcore: convert even into a directory that holds training checkpoints (they stay, "
                             "and the latest pointer keeps naming the newest)")
    args = parser.parse_args(argv)
    from megatron.training.notices import quiet_known_notices

    quiet_known_notices()
    if args.loader == args.saver:
        parser.error("--loader and --saver must differ")
    try:
        return _convert(args)
    except ConversionError as e:
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _convert(args) -> int:
    if not os.path.isdir(args.load_dir):
        raise ConversionError(f"--load-dir {args.load_dir} does not exist or is not a directory")
    if not os.access(args.load_dir, os.R_OK | os.X_OK):
        raise ConversionError(f"--load-dir {args.load_dir} cannot be read (permission denied)")
    if args.saver == "mcore" and not args.overwrite:
        trained = _training_checkpoints(args.save_dir)
        if trained:
            # a requeued "convert, then train" job: the run continues from its own checkpoints
            print(f"{args.save_dir} already holds training checkpoints (newest: iteration {max(trained)}); nothing "
                  f"converted, so a run with --load {args.save_dir} resumes from them. Convert into another "
                  f"directory, or pass --overwrite to write the converted weights beside them.")
            return 0
    convert = hf_to_mcore if args.loader == "hf" else mcore_to_hf
    print(f"wrote {convert(args.model_type, args.load_dir, args.save_dir)}")
    return 0


def _training_checkpoints(directory: str) -> list:
    """Iterations of the checkpoints in ``directory`` written by training (not weights-only)."""
    if not os.path.isdir(directory):
        return []
    from megatron.core import dist_checkpointing

    from megatron.training.checkpointing import checkpoint_name, list_checkpoints

    found = []
    for iteration in list_checkpoints(directory):
        try:
            kind = dist_checkpointing.load_common_state_dict(checkpoint_name(directory, iteration)).get("kind")
        except Exception:  # an unreadable checkpoint is still someone's work
            kind = "training"
        if kind != "weights":
            found.append(iteration)
    return found


if __name__ == "__main__":
    sys.exit(main())
