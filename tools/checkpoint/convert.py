#!/usr/bin/env python
"""Convert between Hugging Face checkpoints and this project's (megatron-core) checkpoints.

    # Hugging Face -> megatron-core (weights only; load with --load, any TP / FPDT layout)
    python tools/checkpoint/convert.py --model-type llama --loader hf --saver mcore \\
        --load-dir /models/Llama-3-8B --save-dir ckpt/llama3_8b
    # megatron-core -> Hugging Face (newest usable checkpoint in --load-dir, any layout it was saved with)
    python tools/checkpoint/convert.py --model-type llama --loader mcore --saver hf \\
        --load-dir runs/llama3_8b --save-dir hf/llama3_8b_trained

Model types: ``llama`` (LlamaForCausalLM: RMSNorm, SwiGLU, RoPE with its base, plain or scaled as
Llama 3.1's (``rope_type: llama3``, our --use-rope-scaling and --rope-scaling-*), linearly
(``rope_type: linear``, our --rotary-seq-len-interpolation-factor) or by YaRN (``rope_type: yarn``
with its attention factor, our --position-embedding-type yarn with --rotary-scaling-factor, --yarn-*
and --mscale/--mscale-all-dim), GQA, any head dimension, tied or untied embeddings) and ``gpt2`` (GPT2LMHeadModel: LayerNorm, tanh or exact GeLU, biases,
learned positions, tied embeddings). Hugging Face weights are read from
safetensors (single file or sharded with an index) or pytorch_model.bin. Runs in one process on
the CPU; megatron-core's distributed checkpoints reshard on load, so one converted checkpoint
serves every parallel layout.

Export streams (``tools/checkpoint/stream.py``): the model is built on the meta device, each
tensor is read from its stored region of the checkpoint when the mapping needs it, and written
into safetensors shards of at most ``--max-shard-size`` (``model-0000i-of-0000N.safetensors`` and
``model.safetensors.index.json``, or one ``model.safetensors``), so memory is about one shard; the
run's tokenizer is written for ``AutoTokenizer`` (``tools/checkpoint/hf_tokenizer.py``), and
config.json last. Import holds the whole model in memory.

Nothing is converted approximately. A config.json of another architecture (Qwen2, Mistral, ...),
a config field with a value that changes the computation in a way the mapping does not carry
(biases, a sliding window, RoPE scaled other than llama3, linear or yarn, a YaRN attention factor
other than 1 with a factor <= 1, another activation, ...), a
weight with no place in the mapping, a missing weight or one of the wrong shape is refused by name; so is a checkpoint of
ours whose model the requested Hugging Face class cannot express (a GPT model exported as
Llama): ``tools/checkpoint/checks.py``. Input errors are one line and exit code 2.

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
A checkpoint trained with --apply-layernorm-1p stores each norm weight as w with the norm scaling by
1 + w; Hugging Face stores the full 1 + w: export adds 1 to every norm weight, and import with
``--apply-layernorm-1p`` (a checkpoint for runs with that flag) subtracts it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tools.checkpoint.checks import (GPT2_ACTIVATIONS, MODEL_TYPES, ConversionError, canonical_names,  # noqa: E402
                                     check_architecture, check_exportable, check_hf_weights, hf_config_problems,
                                     hf_weight_files, read_hf_config, read_hf_weight_file, rope_scaling, rope_theta)
from tools.progress import Progress, add_progress_flag  # noqa: E402


# -- configs -----------------------------------------------------------------------------


def _vocab_multiple(vocab: int) -> int:
    """The largest power of two up to 128 that divides the vocabulary: no padded rows at TP 1, so the
    softmax runs over exactly the model's tokens (padded logits would be 0, not -inf)."""
    return next(m for m in (128, 64, 32, 16, 8, 4, 2, 1) if vocab % m == 0)


def _rope_scaling_fields(c: dict) -> dict:
    """Our ModelConfig fields for the RoPE scaling of a (checked) Llama config.json."""
    scaling, _ = rope_scaling(c)
    if scaling is None:
        return {}
    if scaling["rope_type"] == "linear":
        return {"rotary_seq_len_interpolation_factor": float(scaling["factor"])}
    if scaling["rope_type"] == "yarn":  # its parameters as checks._yarn gives them
        return {"position_embedding_type": "yarn", "rotary_scaling_factor": float(scaling["factor"]),
                "yarn_original_max_position_embeddings": scaling["original_max_position_embeddings"],
                "yarn_beta_fast": scaling["beta_fast"], "yarn_beta_slow": scaling["beta_slow"],
                "mscale": scaling["mscale"], "mscale_all_dim": scaling["mscale_all_dim"],
                "yarn_correction_range_round_to_int": scaling["truncate"]}
    return {"use_rope_scaling": True, "rope_scaling_factor": float(scaling["factor"]),
            "rope_scaling_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_scaling_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_scaling_original_max_position_embeddings": scaling["original_max_position_embeddings"]}


def _hf_rope_scaling(a: dict) -> dict:
    """config.json's ``rope_scaling`` for our RoPE arguments (transformers 4.43+ and 5 read it): {} for plain RoPE.
    YaRN's attention factor: megatron-core's mscale and mscale_all_dim when both are non-zero (transformers
    then derives the same), else nothing when it is transformers' default, else the value itself."""
    if a.get("position_embedding_type") == "yarn":
        from tools.checkpoint.checks import yarn_attention_factor

        factor, mscale, mscale_all_dim = float(a["rotary_scaling_factor"]), a["mscale"], a["mscale_all_dim"]
        scaling = {"rope_type": "yarn", "factor": factor,
                   "original_max_position_embeddings": a["yarn_original_max_position_embeddings"],
                   "beta_fast": float(a["yarn_beta_fast"]), "beta_slow": float(a["yarn_beta_slow"]),
                   "truncate": bool(a["yarn_correction_range_round_to_int"])}
        attention_factor = yarn_attention_factor(factor, mscale, mscale_all_dim)
        if mscale and mscale_all_dim:
            scaling.update(mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
        elif attention_factor != yarn_attention_factor(factor, 1.0, 0.0):
            scaling["attention_factor"] = attention_factor
        return {"rope_scaling": scaling}
    if a.get("use_rope_scaling"):
        original = a["rope_scaling_original_max_position_embeddings"]
        return {"rope_scaling": {"rope_type": "llama3", "factor": float(a["rope_scaling_factor"]),
                                 "low_freq_factor": float(a["rope_scaling_low_freq_factor"]),
                                 "high_freq_factor": float(a["rope_scaling_high_freq_factor"]),
                                 "original_max_position_embeddings": original}}
    if a.get("rotary_seq_len_interpolation_factor") is not None:
        return {"rope_scaling": {"rope_type": "linear", "factor": float(a["rotary_seq_len_interpolation_factor"])}}
    return {}


def model_config_from_hf(model_type: str, c: dict, where: str = "config.json"):
    """Our :class:`~megatron.training.config.ModelConfig` for the model a Hugging Face config.json
    describes; raises ConversionError, naming the fields, for anything it cannot describe exactly."""
    from megatron.training.config import ModelConfig

    check_architecture(model_type, c, where)
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
                rotary_base=rope_theta(c),
                max_position_embeddings=c.get("max_position_embeddings") or 4096,
                untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
                **{"position_embedding_type": "rope", **_rope_scaling_fields(c)}, **common)
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
                "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", **_hf_rope_scaling(a)}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_embd": a["hidden_size"], "n_layer": a["num_layers"], "n_head": a["num_attention_heads"],
            "n_inner": a["ffn_hidden_size"], "n_positions": a["max_position_embeddings"],
            "layer_norm_epsilon": a["norm_epsilon"], "activation_function": "gelu_new" if a["openai_gelu"] else "gelu",
            "tie_word_embeddings": True, "torch_dtype": "float32"}


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


class _ShiftedNormWeights(Mapping):
    """``sd`` (our names) with ``shift`` added to every norm weight, in at least float32: between
    zero-centred weights (--apply-layernorm-1p) and Hugging Face's full ones."""

    def __init__(self, sd: Mapping, shift: float):
        self.sd, self.shift = sd, shift

    def __getitem__(self, name):
        tensor = self.sd[name]
        if not name.endswith("layernorm.weight"):
            return tensor
        return tensor.to(torch.promote_types(tensor.dtype, torch.float32)) + self.shift

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)


def hf_to_megatron(model_type, hf, a, padded_vocab):
    out = _hf_to_megatron(model_type, hf, a, padded_vocab)
    return dict(_ShiftedNormWeights(out, -1.0).items()) if a.get("apply_layernorm_1p") else out


def _hf_to_megatron(model_type, hf, a, padded_vocab):
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


def iter_megatron_to_hf(model_type, sd, a, vocab):
    """(Hugging Face name, tensor) for our state dict ``sd`` (any mapping: a dict, or
    :class:`~tools.checkpoint.stream.CheckpointTensors` reading each tensor from disk when asked),
    one at a time in the file order: embeddings, each layer's, the final norm, the output layer.
    Zero-centred norm weights (--apply-layernorm-1p) come out as Hugging Face's: 1 + w."""
    heads, groups = a["num_attention_heads"], a["num_query_groups"]
    if a.get("apply_layernorm_1p"):
        sd = _ShiftedNormWeights(sd, 1.0)
    if model_type == "llama":
        yield "model.embed_tokens.weight", sd["embedding.word_embeddings.weight"][:vocab]
        for i in range(a["num_layers"]):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            yield p + "input_layernorm.weight", sd[m + "input_layernorm.weight"]
            q, k, v = _qkv_from_megatron(sd[m + "self_attention.linear_qkv.weight"], heads, groups)
            yield from ((p + "self_attn.q_proj.weight", q), (p + "self_attn.k_proj.weight", k),
                        (p + "self_attn.v_proj.weight", v))
            yield p + "self_attn.o_proj.weight", sd[m + "self_attention.linear_proj.weight"]
            yield p + "post_attention_layernorm.weight", sd[m + "pre_mlp_layernorm.weight"]
            gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2)
            yield from ((p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up))
            yield p + "mlp.down_proj.weight", sd[m + "mlp.linear_fc2.weight"]
        yield "model.norm.weight", sd["decoder.final_layernorm.weight"]
        if a["untie_embeddings_and_output_weights"]:
            yield "lm_head.weight", sd["output_layer.weight"][:vocab]
        return
    yield "transformer.wte.weight", sd["embedding.word_embeddings.weight"][:vocab]
    yield "transformer.wpe.weight", sd["embedding.position_embeddings.weight"]
    for i in range(a["num_layers"]):
        p, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            yield p + theirs + ".weight", sd[m + ours + ".weight"]
            yield p + theirs + ".bias", sd[m + ours + ".bias"]
        yield p + "attn.c_attn.weight", torch.cat(_qkv_from_megatron(sd[m + "self_attention.linear_qkv.weight"],
                                                                     heads, heads)).t()
        yield p + "attn.c_attn.bias", torch.cat(_qkv_from_megatron(sd[m + "self_attention.linear_qkv.bias"],
                                                                   heads, heads))
        yield p + "attn.c_proj.weight", sd[m + "self_attention.linear_proj.weight"].t()
        yield p + "attn.c_proj.bias", sd[m + "self_attention.linear_proj.bias"]
        yield p + "mlp.c_fc.weight", sd[m + "mlp.linear_fc1.weight"].t()
        yield p + "mlp.c_fc.bias", sd[m + "mlp.linear_fc1.bias"]
        yield p + "mlp.c_proj.weight", sd[m + "mlp.linear_fc2.weight"].t()
        yield p + "mlp.c_proj.bias", sd[m + "mlp.linear_fc2.bias"]
    yield "transformer.ln_f.weight", sd["decoder.final_layernorm.weight"]
    yield "transformer.ln_f.bias", sd["decoder.final_layernorm.bias"]


def megatron_to_hf(model_type, sd, a, vocab):
    return {k: v.detach().clone().contiguous() for k, v in iter_megatron_to_hf(model_type, sd, a, vocab)}


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


class _Float32Weights(Mapping):
    """``weights`` in float32, each converted when the mapping asks for it, counted on ``bar``."""

    def __init__(self, weights: dict, bar: Progress):
        self.weights, self.bar = weights, bar

    def __getitem__(self, name):
        tensor = self.weights[name].float()
        self.bar.update(1)
        return tensor

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def hf_to_mcore(model_type, load_dir, save_dir, progress=False, apply_layernorm_1p=False):
    """Import a Hugging Face folder as a weights-only checkpoint in ``save_dir``; with ``progress``,
    the weights read (bytes) and mapped (tensors) on stderr; with ``apply_layernorm_1p``, for runs
    with --apply-layernorm-1p (norm weights stored less 1)."""
    from megatron.training.checkpointing import model_args_dict, write_checkpoint

    hf_config = read_hf_config(load_dir)
    model_config = model_config_from_hf(model_type, hf_config, os.path.join(load_dir, "config.json"))
    model_config = dataclasses.replace(model_config, apply_layernorm_1p=apply_layernorm_1p)
    vocab = hf_config["vocab_size"]
    files = hf_weight_files(load_dir)
    with Progress(sum(os.path.getsize(f) for f in files), "import read", unit="B", enabled=progress) as bar:
        weights = {}
        for count, path in enumerate(files, start=1):
            weights.update(read_hf_weight_file(path))
            bar.update(os.path.getsize(path), files=f"{count}/{len(files)}")
        weights = canonical_names(model_type, weights)
        check_hf_weights(model_type, model_config, vocab, weights, load_dir)
    config, model, padded = _single_process_model(model_config, vocab)
    with Progress(len(weights), "import map", unit="tensor", enabled=progress) as bar:
        state = hf_to_megatron(model_type, _Float32Weights(weights, bar), dataclasses.asdict(model_config), padded)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:  # the mapping and our model disagree: a bug here, not in the input
        raise RuntimeError(f"converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return write_checkpoint(save_dir, 0, {"model": model.sharded_state_dict(), "kind": "weights",
                                          "model_args": model_args_dict(config), "true_vocab_size": vocab,
                                          "padded_vocab_size": padded}, {})


def mcore_to_hf(model_type, load_dir, save_dir, dtype="auto", max_shard_size="5GB", tokenizer_files=None,
                progress=False):
    """Export the newest usable checkpoint in ``load_dir`` as a Hugging Face folder: weights in
    ``dtype`` ("auto": the dtype the run trained in), streamed into safetensors shards of at most
    ``max_shard_size``, the run's tokenizer (its files as the checkpoint names them, or as
    ``tokenizer_files`` overrides: {"tokenizer_model"|"vocab_file"|"merge_file": path}) and
    config.json; with ``progress``, the bytes and tensors written on stderr. Returns (the folder,
    the weight files written)."""
    import torch.distributed as dist

    from fpdt_ext.runtime import init_distributed

    init_distributed()
    try:
        return _mcore_to_hf(model_type, load_dir, save_dir, dtype, max_shard_size, tokenizer_files or {}, progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _mcore_to_hf(model_type, load_dir, save_dir, dtype, max_shard_size, tokenizer_files, progress):
    from megatron.core import dist_checkpointing

    from megatron.training.checkpointing import model_config_from_args, newest_usable_checkpoint, saved_padded_vocab
    from tools.checkpoint.hf_tokenizer import export_tokenizer
    from tools.checkpoint.stream import CheckpointTensors, MetaTensors, parse_size, write_streamed

    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConversionError(f"--max-shard-size: {e}") from None
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
    with torch.device("meta"):  # names, shapes and stored regions only: no weight is held in memory
        _, meta_model, _ = _single_process_model(model_config, vocab, saved_padded_vocab(common))
    fields = dataclasses.asdict(model_config)
    dtype_name = (a.get("params_dtype") or "float32") if dtype == "auto" else dtype  # the training dtype by default
    target = getattr(torch, dtype_name)
    nbytes = torch.empty((), dtype=target).element_size()
    planned = [(name, t.numel() * nbytes) for name, t in iter_megatron_to_hf(model_type, MetaTensors(meta_model),
                                                                              fields, vocab)]
    stored = CheckpointTensors(path, meta_model)
    converted = ((name, t.to(target)) for name, t in iter_megatron_to_hf(model_type, stored, fields, vocab))
    try:
        os.makedirs(save_dir, exist_ok=True)
        config_path = os.path.join(save_dir, "config.json")
        if os.path.exists(config_path):  # a folder with a config.json is a complete export: it is written last
            os.remove(config_path)
        # the tokenizer first: cheap, and its files (moved since training?) are the likeliest mistake
        tokenizer = export_tokenizer({**a, **tokenizer_files}, save_dir, vocab_size=vocab)
        config = {**hf_config_from_args(model_type, fields, vocab), **tokenizer.config_fields(),
                  "torch_dtype": dtype_name}
        files = write_streamed(save_dir, converted, planned, max_shard_bytes, progress).files
        with open(config_path + ".tmp", "w") as f:
            json.dump(config, f, indent=1)
        os.replace(config_path + ".tmp", config_path)
    except OSError as e:
        raise ConversionError(f"--save-dir {save_dir} cannot be written ({e.strerror or e})") from None
    return save_dir, files


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
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="--saver hf: the weights' dtype (auto: the dtype the checkpoint's run trained in)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="--saver hf: the largest safetensors file (Hugging Face's spelling: 5GB, 500MB, 2GiB); "
                             "a model larger than one is written as model-0000i-of-0000N.safetensors with "
                             "model.safetensors.index.json. Export streams: its memory is about one shard")
    parser.add_argument("--apply-layernorm-1p", action="store_true",
                        help="--loader hf: a checkpoint for runs with --apply-layernorm-1p (zero-centred norm "
                             "weights: Hugging Face's less 1). Export reads it from the checkpoint")
    for flag, what in (("--tokenizer-model", "tokenizer.model or Hugging Face tokenizer folder"),
                       ("--vocab-file", "GPT-2 vocab.json"), ("--merge-file", "GPT-2 merges.txt")):
        parser.add_argument(flag, default=None, help=f"--saver hf: the run's {what}, where it is now (default: the "
                                                     f"path the checkpoint recorded at training)")
    add_progress_flag(parser)
    args = parser.parse_args(argv)
    from megatron.training.notices import quiet_known_notices

    quiet_known_notices()
    if args.loader == args.saver:
        parser.error("--loader and --saver must differ")
    if args.apply_layernorm_1p and args.loader != "hf":
        parser.error("--apply-layernorm-1p is for --loader hf: export reads it from the checkpoint")
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
    if args.loader == "hf":
        written = hf_to_mcore(args.model_type, args.load_dir, args.save_dir, progress=not args.no_progress,
                              apply_layernorm_1p=args.apply_layernorm_1p)
    else:
        overrides = {k: getattr(args, k) for k in ("tokenizer_model", "vocab_file", "merge_file") if getattr(args, k)}
        written, files = mcore_to_hf(args.model_type, args.load_dir, args.save_dir, args.dtype, args.max_shard_size,
                                     overrides, progress=not args.no_progress)
        print(f"wrote {len(files)} weight file{'s' * (len(files) > 1)} ({files[0]}{' ...' * (len(files) > 1)})")
    print(f"wrote {written}")
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
