"""Hugging Face <-> megatron-core conversion, checked against ``transformers``.

Tiny randomly initialised models built from a config (nothing is downloaded):
Llama with GQA, RoPE base 500000 and untied embeddings; Llama with tied
embeddings; Llama with a head dimension other than hidden / heads; Llama with
RoPE scaled as Llama 3.1's (``rope_type: llama3``), linearly interpolated, and
by YaRN (``rope_type: yarn``, with its attention factor), compared past the
original context; GPT-2 with the tanh GeLU and with the exact one. A training
stage that changes the RoPE settings exports them. HF -> ours: our model's logits equal the
original's (float32, max abs difference below 1e-4). Ours -> HF: transformers
loads the export and its logits equal the original's. Checkpoints the converter
cannot convert exactly (Qwen2, Mistral, Llama with biases, a GPT model exported
as Llama, a truncated weight file) are refused in one line, exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fpdt_ext.testing.spawn import run_world
from tests.helpers import ROOT, run_script

transformers = pytest.importorskip("transformers")
TOOL = os.path.join(ROOT, "tools", "checkpoint", "convert.py")
VOCAB, SEQ = 200, 48
KINDS = ["llama", "llama_tied", "llama_head_dim", "llama_llama3", "llama_linear", "llama_yarn", "gpt2", "gpt2_gelu"]
# in the slow tier (suite time): tied embeddings are also GPT-2's, and gelu is GPT-2 with another activation
SLOW_KINDS = {"llama_tied", "gpt2_gelu"}
KIND_PARAMS = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KINDS else k for k in KINDS]
# Scaled RoPE from an original context of 32 tokens (SEQ is past it); with base 10000 and head
# dimension 16 llama3's three bands (kept, smoothed, divided by the factor) all hold frequencies,
# and so do YaRN's (kept, blended, interpolated: its ramp runs from dimension 0.2 to 2.0 of 8, untruncated).
# YaRN's attention factor from mscale and mscale_all_dim (1.039; 1.139 from the factor alone).
ROPE_SCALING = {"llama_llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32},
                "llama_linear": {"rope_type": "linear", "factor": 4.0},
                "llama_yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                               "beta_fast": 4.0, "beta_slow": 0.5, "truncate": False, "mscale": 0.8,
                               "mscale_all_dim": 0.5}}


def _hf_model(kind):
    torch.manual_seed(0)
    if kind.startswith("llama"):
        scaling = ROPE_SCALING.get(kind)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0 if scaling else 500000.0, rms_norm_eps=1e-5,
            max_position_embeddings=128, tie_word_embeddings=kind == "llama_tied",
            head_dim=32 if kind == "llama_head_dim" else None, rope_scaling=dict(scaling) if scaling else None,
            initializer_range=0.2 if scaling else 0.02)  # attention that depends on position: scaling shows
        model = transformers.LlamaForCausalLM(config)
    else:
        # weights large enough that the two GeLUs differ in the logits (by 2e-3; by 2e-6 at the default 0.02)
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=0, eos_token_id=0, initializer_range=0.2,
                                         activation_function="gelu" if kind == "gpt2_gelu" else "gelu_new")
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # random norms and biases too, so that every mapping is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _convert(model_type, loader, saver, load_dir, save_dir, *flags):
    proc = subprocess.run([sys.executable, TOOL, "--model-type", model_type, "--loader", loader, "--saver", saver,
                           "--load-dir", str(load_dir), "--save-dir", str(save_dir), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # results on stdout; progress (a log here: stderr is not a terminal) on stderr, one last line per phase
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["wrote"] * (1 if saver == "mcore" else 2)
    progress = [line for line in proc.stderr.splitlines() if "%|" in line]
    phases = ["import read", "import map"] if saver == "mcore" else ["export"]
    assert [line.split(":")[0] for line in progress] == phases, proc.stderr
    assert all(line.split(":")[1].startswith(" 100%|") and "/s" in line for line in progress), proc.stderr
    if saver == "hf":
        assert re.search(r"tensors=(\d+)/\1, shard=1/1\]$", progress[0]), progress[0]


def our_logits_worker(rank, world_size, checkpoint_dir, tokens, iteration=0):
    from megatron.core import dist_checkpointing

    from tools.checkpoint import convert

    path = os.path.join(checkpoint_dir, f"iter_{iteration:07d}")
    common = dist_checkpointing.load_common_state_dict(path)
    from megatron.training.checkpointing import model_config_from_args

    _, model, _ = convert._single_process_model(model_config_from_args(common["model_args"]),
                                                common["true_vocab_size"])
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"])
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)  # [b, s, V_padded]
    return logits[..., :VOCAB]


@functools.lru_cache(maxsize=None)
def converted(kind, tmp_root):
    model = _hf_model(kind)
    hf_dir, mcore_dir, back_dir = (os.path.join(tmp_root, kind, d) for d in ("hf", "mcore", "back"))
    model.save_pretrained(hf_dir)
    model_type = "gpt2" if kind.startswith("gpt2") else "llama"
    _convert(model_type, "hf", "mcore", hf_dir, mcore_dir)
    _convert(model_type, "mcore", "hf", mcore_dir, back_dir)
    return model, mcore_dir, back_dir


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("convert"))


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_hf_to_ours_gives_the_same_logits(kind, tmp_root):
    model, mcore_dir, _ = converted(kind, tmp_root)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    ours = run_world(1, our_logits_worker, mcore_dir, tokens)[0]
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_ours_to_hf_loads_in_transformers_with_the_same_logits(kind, tmp_root):
    model, _, back_dir = converted(kind, tmp_root)
    cls = transformers.GPT2LMHeadModel if kind.startswith("gpt2") else transformers.LlamaForCausalLM
    back = cls.from_pretrained(back_dir).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (back(tokens).logits - model(tokens).logits).abs().max().item() < 1e-4
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    field = "head_dim" if kind.startswith("llama") else "activation_function"
    assert getattr(back.config, field) == getattr(model.config, field)
    if kind.startswith("llama"):
        assert back.config.rope_parameters == model.config.rope_parameters


def layernorm_1p_worker(rank, world_size, checkpoint_dir, tokens):
    """Our model from the checkpoint: (its logits, its norm weights as loaded, its 1p setting)."""
    from megatron.core import dist_checkpointing

    from megatron.training.checkpointing import model_config_from_args
    from tools.checkpoint import convert

    path = os.path.join(checkpoint_dir, "iter_0000000")
    common = dist_checkpointing.load_common_state_dict(path)
    config = model_config_from_args(common["model_args"])
    _, model, _ = convert._single_process_model(config, common["true_vocab_size"])
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"])
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :VOCAB]
    stored = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("layernorm.weight")}
    return logits, stored, config.apply_layernorm_1p


def test_layernorm_1p_imports_weights_less_one_and_exports_them_plus_one(tmp_path):
    """--apply-layernorm-1p: import (--loader hf --apply-layernorm-1p) stores Hugging Face's norm
    weights less 1 in a checkpoint for 1p runs, whose model gives transformers' logits; its export
    writes the stored weights plus 1, which transformers loads with the original logits."""
    model = _hf_model("llama")
    hf_dir, mcore_dir, back_dir = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    model.save_pretrained(str(hf_dir))
    _convert("llama", "hf", "mcore", hf_dir, mcore_dir, "--apply-layernorm-1p")
    tokens = _tokens()
    ours, stored, one_p = run_world(1, layernorm_1p_worker, str(mcore_dir), tokens)[0]
    assert one_p is True
    names = {"decoder.final_layernorm.weight": "model.norm.weight"}
    for i in range(2):
        names[f"decoder.layers.{i}.input_layernorm.weight"] = f"model.layers.{i}.input_layernorm.weight"
        names[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = f"model.layers.{i}.post_attention_layernorm.weight"
    assert stored.keys() == names.keys()
    with torch.no_grad():
        expected = model(tokens).logits
    assert (ours - expected).abs().max().item() < 1e-4
    _convert("llama", "mcore", "hf", mcore_dir, back_dir)
    back = transformers.LlamaForCausalLM.from_pretrained(str(back_dir)).eval()
    hf_weights, back_weights = dict(model.named_parameters()), dict(back.named_parameters())
    for ours_name, hf_name in names.items():
        torch.testing.assert_close(stored[ours_name], hf_weights[hf_name].detach() - 1, rtol=0, atol=1e-6)
        torch.testing.assert_close(back_weights[hf_name].detach(), stored[ours_name] + 1, rtol=0, atol=0)
    with torch.no_grad():
        assert (back(tokens).logits - expected).abs().max().item() < 1e-4


def test_export_writes_the_training_dtype_or_the_one_asked(tmp_root, tmp_path):
    """The converted checkpoint's run dtype is float32 (auto keeps it); --dtype bfloat16 writes bf16
    weights and says so in config.json; transformers loads it with logits within bf16 rounding."""
    from safetensors import safe_open

    model, mcore_dir, back_dir = converted("llama", tmp_root)
    with safe_open(os.path.join(back_dir, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert json.load(open(os.path.join(back_dir, "config.json")))["torch_dtype"] == "float32"
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, TOOL, "--model-type", "llama", "--loader", "mcore", "--saver", "hf",
                           "--load-dir", mcore_dir, "--save-dir", str(out), "--dtype", "bfloat16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
    back = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (back(_tokens()).logits - model(_tokens()).logits).abs().max().item()
    assert 0 < difference < 0.1  # bf16 weights: not bit-equal, close


SCALED_ARGS = {"llama_llama3": {"use_rope_scaling": True, "rope_scaling_factor": 8.0,
                                 "rope_scaling_low_freq_factor": 1.0, "rope_scaling_high_freq_factor": 4.0,
                                 "rope_scaling_original_max_position_embeddings": 32,
                                 "rotary_seq_len_interpolation_factor": None},
               "llama_linear": {"use_rope_scaling": False, "rotary_seq_len_interpolation_factor": 4.0},
               "llama_yarn": {"position_embedding_type": "yarn", "rotary_scaling_factor": 4.0,
                              "yarn_original_max_position_embeddings": 32, "yarn_beta_fast": 4.0, "yarn_beta_slow": 0.5,
                              "mscale": 0.8, "mscale_all_dim": 0.5, "yarn_correction_range_round_to_int": False}}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALING))
def test_the_scaling_is_carried_and_changes_the_logits(kind, tmp_root):
    """The converted checkpoint's model arguments hold the scaling, and the round trips above
    are not blind to it: the same weights with plain RoPE give other logits at these positions."""
    from megatron.core import dist_checkpointing

    model, mcore_dir, _ = converted(kind, tmp_root)
    args = dist_checkpointing.load_common_state_dict(os.path.join(mcore_dir, "iter_0000000"))["model_args"]
    assert {k: args[k] for k in SCALED_ARGS[kind]} == SCALED_ARGS[kind]
    config = transformers.LlamaConfig.from_dict({**model.config.to_dict(), "rope_parameters": None,
                                                 "rope_scaling": None, "rope_theta": 10000.0})
    plain = transformers.LlamaForCausalLM(config).eval()
    plain.load_state_dict(model.state_dict())
    tokens = _tokens()
    with torch.no_grad():
        assert (plain(tokens).logits - model(tokens).logits)[:, 32:].abs().max().item() > 0.1


def test_a_stage_with_new_rope_settings_exports_with_them(tmp_path):
    """A context-extension stage: trained at 32 tokens with RoPE base 10000, continued at 64 with
    base 500000 and Llama 3.1's scaling from those 32 tokens. The new stage's checkpoint holds the
    new settings, and its export gives transformers the logits our model computes."""
    flags = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
             "--group-query-attention", "--num-query-groups", "2", "--vocab-size", str(VOCAB), "--mock-data",
             "--eval-iters", "0", "--save-interval", "1", "--lr", "1e-3"]
    first, second = tmp_path / "first", tmp_path / "second"
    run_script(1, "pretrain_llama.py", flags + ["--seq-length", "32", "--train-iters", "1", "--save", str(first)],
               timeout=600)
    scaled = ["--rotary-base", "500000", "--use-rope-scaling", "--rope-scaling-factor", "8",
              "--rope-scaling-original-max-position-embeddings", "32"]
    out = run_script(1, "pretrain_llama.py", flags + ["--seq-length", "64", "--train-iters", "2", "--load",
                                                      str(first), "--save", str(second), *scaled], timeout=600).stdout
    assert "was trained with --rotary-base 10000.0; this run uses 500000.0" in out
    assert "was trained with --use-rope-scaling False; this run uses True" in out
    hf_dir = tmp_path / "hf"
    _convert("llama", "mcore", "hf", second, hf_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    assert hf.config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    os.rename(second / "iter_0000002", second / "iter_0000000")  # where our_logits_worker reads
    ours = run_world(1, our_logits_worker, str(second), tokens)[0]
    with torch.no_grad():
        assert (hf(tokens).logits - ours).abs().max().item() < 1e-4


@pytest.mark.fault
@pytest.mark.parametrize("nproc,flags", [(1, []), (2, ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size",
                                                       "16", "--fpdt-offload"]),
                                         (2, ["--tensor-model-parallel-size", "2"]),
                                         (2, ["--pipeline-model-parallel-size", "2", "--fpdt"])],
                         ids=["1proc", "fpdt2", "tp2", "pp2"])
def test_eval_ppl_matches_transformers_nll(nproc, flags, tmp_root, tmp_path):
    """At TP 2 Megatron would pad the vocabulary of 200 to 208 rows: the checkpoint's 200 are kept."""
    import json

    model, mcore_dir, _ = converted("llama", tmp_root)
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (40, 65, 97)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"tokens": d, "id": f"d{i}"}) + "\n"
                                                 for i, d in enumerate(docs)))
    argv = ["--load", mcore_dir, "--input", str(tmp_path / "docs.jsonl"), "--bucket-size", "32", *flags]
    proc = run_script(nproc, "tools/eval_ppl.py", [*argv, "--output", str(tmp_path / "ppl.jsonl")], timeout=600)
    # progress on stderr, from rank 0 only: in a log (not a terminal) one last line, with rate and time left
    [line] = [line for line in proc.stderr.splitlines() if "%|" in line]
    assert re.match(r"eval_ppl: 100%\|#+\| 199/199 \[\d\d:\d\d<00:00, +[\d.]+token/s, docs=3/3\]$", line), line
    assert "%|" not in proc.stdout and "token/s" not in proc.stdout
    if nproc == 1:  # --no-progress: no progress, and the same stdout and results
        quiet = run_script(nproc, "tools/eval_ppl.py", [*argv, "--output", str(tmp_path / "quiet.jsonl"),
                                                        "--no-progress"], timeout=600)
        assert "%|" not in quiet.stderr and quiet.stdout == proc.stdout
        assert (tmp_path / "quiet.jsonl").read_text() == (tmp_path / "ppl.jsonl").read_text()
    rows = [json.loads(line) for line in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    per_doc, summary = rows[:-1], rows[-1]
    all_nll = []
    for i, (row, doc) in enumerate(zip(per_doc, docs)):
        ids = torch.tensor(doc).view(1, -1)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        all_nll.append(nll)
        assert row["tokens"] == len(doc) - 1 and row["id"] == f"d{i}"
        assert row["nll"] == pytest.approx(nll.mean().item(), abs=1e-4)
    assert summary["tokens"] == sum(len(d) - 1 for d in docs)
    assert [(b["start"], b["end"]) for b in summary["buckets"]] == [(0, 32), (32, 64), (64, 96)]
    first = torch.cat([n[:32] for n in all_nll]).mean().item()
    assert summary["buckets"][0]["nll"] == pytest.approx(first, abs=1e-4)


@pytest.mark.fault
def test_converting_again_into_a_run_directory_loses_no_training(tmp_root, tmp_path):
    """A requeued "convert, then train" job runs the conversion again into the run directory: it
    must not write there (the run resumes from its own checkpoints), and even when told to
    (--overwrite) the latest pointer never moves back to the converted iteration 0."""
    converted("llama", tmp_root)
    hf_dir, run = os.path.join(tmp_root, "llama", "hf"), tmp_path / "run"
    flags = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
             "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--vocab-size",
             str(VOCAB), "--mock-data", "--eval-iters", "0"]
    run_script(1, "pretrain_llama.py", flags + ["--train-iters", "2", "--save", str(run), "--save-interval", "1"],
               timeout=600)
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "2"
    again = run_script(1, "tools/checkpoint/convert.py", ["--model-type", "llama", "--loader", "hf", "--saver",
                                                          "mcore", "--load-dir", hf_dir, "--save-dir", str(run)])
    assert "already holds training checkpoints (newest: iteration 2); nothing converted" in again.stdout
    assert not (run / "iter_0000000").exists()
    run_script(1, "tools/checkpoint/convert.py", ["--model-type", "llama", "--loader", "hf", "--saver", "mcore",
                                                  "--load-dir", hf_dir, "--save-dir", str(run), "--overwrite"])
    assert (run / "iter_0000000").exists() and (run / "iter_0000002").exists()
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "2"
    resumed = run_script(1, "pretrain_llama.py", flags + ["--train-iters", "3", "--load", str(run)], timeout=600)
    assert "loaded checkpoint" in resumed.stdout and "iteration 2" in resumed.stdout


# -- refusals --------------------------------------------------------------------------------


def _tiny(cls_name, **extra):
    """A tiny randomly initialised transformers model ``cls_name`` (e.g. "Qwen2") with its own config class."""
    config = getattr(transformers, f"{cls_name}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **extra)
    return getattr(transformers, f"{cls_name}ForCausalLM")(config)


def _relabel_as_llama(hf_dir, drop=()):
    """Edit config.json as if the checkpoint were a Llama (a hand-edited or mislabelled download)."""
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    for key in drop:
        config.pop(key)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("cls_name,extra,relabel,refused", [
    ("Qwen2", {}, None, "config.json says Qwen2ForCausalLM (model_type qwen2); the converter supports "
                        "LlamaForCausalLM (--model-type llama) and GPT2LMHeadModel (--model-type gpt2)"),
    ("Qwen2", {}, (), ": weights the LlamaForCausalLM mapping has no place for (they would be dropped): "
                      "model.layers.0.self_attn.k_proj.bias, model.layers.0.self_attn.q_proj.bias, "
                      "model.layers.0.self_attn.v_proj.bias, model.layers.1.self_attn.k_proj.bias and 2 more"),
    ("Mistral", {"sliding_window": 32}, None, "config.json says MistralForCausalLM (model_type mistral)"),
    ("Mistral", {"sliding_window": 32}, (), "config.json: not supported by the converter: sliding_window 32"),
    ("Llama", {"attention_bias": True}, None, "config.json: not supported by the converter: attention_bias true"),
    ("Llama", {"attention_bias": True}, ("attention_bias",), "model.layers.0.self_attn.o_proj.bias"),
], ids=["qwen2", "qwen2-labelled-llama", "mistral", "mistral-labelled-llama", "llama-bias",
        "llama-bias-unlabelled"])
@pytest.mark.fault
def test_checkpoints_that_would_convert_wrongly_are_refused(cls_name, extra, relabel, refused, tmp_path, capsys):
    from tools.checkpoint import convert

    hf_dir = str(tmp_path / "hf")
    _tiny(cls_name, **extra).save_pretrained(hf_dir)
    if relabel is not None:
        _relabel_as_llama(hf_dir, drop=relabel)
    capsys.readouterr()  # save_pretrained's progress bar
    rc = convert.main(["--model-type", "llama", "--loader", "hf", "--saver", "mcore", "--load-dir", hf_dir,
                       "--save-dir", str(tmp_path / "mcore")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"convert.py: error: {hf_dir}"), err
    assert refused in err
    assert not (tmp_path / "mcore").exists()


def _one_line_error(argv):
    proc = subprocess.run([sys.executable, TOOL, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("convert.py: error: "), proc.stderr
    return proc.stderr.strip().removeprefix("convert.py: error: ")


@pytest.mark.fault
def test_a_gpt2_checkpoint_exported_as_llama_is_refused_naming_what_differs(tmp_root, tmp_path):
    _, mcore_dir, _ = converted("gpt2", tmp_root)
    err = _one_line_error(["--model-type", "llama", "--loader", "mcore", "--saver", "hf", "--load-dir", mcore_dir,
                           "--save-dir", str(tmp_path / "hf")])
    assert err == (f"{mcore_dir}/iter_0000000 holds a model LlamaForCausalLM cannot express: "
                   f"position_embedding_type 'learned_absolute' (needs 'rope' or 'yarn'); normalization 'LayerNorm' (needs "
                   f"'RMSNorm'); swiglu False (needs True); add_bias_linear True (needs False); it is a --model-type "
                   f"gpt2 model")
    assert not (tmp_path / "hf").exists()


@pytest.mark.fault
def test_a_truncated_weight_file_exits_2_with_one_line(tmp_path):
    hf_dir = tmp_path / "hf"
    _hf_model("llama").save_pretrained(str(hf_dir))
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = _one_line_error(["--model-type", "llama", "--loader", "hf", "--saver", "mcore", "--load-dir", str(hf_dir),
                           "--save-dir", str(tmp_path / "mcore")])
    assert err == (f"{weights} is truncated or corrupt (Error while deserializing header: incomplete metadata, file "
                   f"not fully covered): download it again")


@pytest.mark.fault
def test_exporting_from_a_directory_without_checkpoints_exits_2_with_one_line(tmp_path):
    err = _one_line_error(["--model-type", "llama", "--loader", "mcore", "--saver", "hf", "--load-dir", str(tmp_path),
                           "--save-dir", str(tmp_path / "hf")])
    assert err == f"--load-dir {tmp_path} holds no usable checkpoint (no iter_* directory)"
