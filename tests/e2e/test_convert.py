"""Hugging Face <-> megatron-core conversion, checked against ``transformers``.

Tiny randomly initialised models built from a config (nothing is downloaded):
Llama with GQA, RoPE base 500000 and untied embeddings; Llama with tied
embeddings; GPT-2. HF -> ours: our model's logits equal the original's (float32,
max abs difference below 1e-4). Ours -> HF: transformers loads the export and
its logits equal the original's.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from fpdt_ext.testing.spawn import run_world
from tests.helpers import ROOT, run_script

transformers = pytest.importorskip("transformers")
TOOL = os.path.join(ROOT, "tools", "checkpoint", "convert.py")
VOCAB, SEQ = 200, 48


def _hf_model(kind):
    torch.manual_seed(0)
    if kind.startswith("llama"):
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
            tie_word_embeddings=kind == "llama_tied")
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # random norms and biases too, so that every mapping is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _convert(model_type, loader, saver, load_dir, save_dir):
    proc = subprocess.run([sys.executable, TOOL, "--model-type", model_type, "--loader", loader, "--saver", saver,
                           "--load-dir", str(load_dir), "--save-dir", str(save_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def our_logits_worker(rank, world_size, checkpoint_dir, tokens):
    from megatron.core import dist_checkpointing

    from tools.checkpoint import convert

    path = os.path.join(checkpoint_dir, "iter_0000000")
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
    model_type = "gpt2" if kind == "gpt2" else "llama"
    _convert(model_type, "hf", "mcore", hf_dir, mcore_dir)
    _convert(model_type, "mcore", "hf", mcore_dir, back_dir)
    return model, mcore_dir, back_dir


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("convert"))


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gpt2"])
def test_hf_to_ours_gives_the_same_logits(kind, tmp_root):
    model, mcore_dir, _ = converted(kind, tmp_root)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    ours = run_world(1, our_logits_worker, mcore_dir, tokens)[0]
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gpt2"])
def test_ours_to_hf_loads_in_transformers_with_the_same_logits(kind, tmp_root):
    model, _, back_dir = converted(kind, tmp_root)
    cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
    back = cls.from_pretrained(back_dir).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (back(tokens).logits - model(tokens).logits).abs().max().item() < 1e-4
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings


@pytest.mark.parametrize("nproc,flags", [(1, []), (2, ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size",
                                                       "16", "--fpdt-offload"])], ids=["1proc", "fpdt2"])
def test_eval_ppl_matches_transformers_nll(nproc, flags, tmp_root, tmp_path):
    import json

    model, mcore_dir, _ = converted("llama", tmp_root)
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (40, 65, 97)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"tokens": d, "id": f"d{i}"}) + "\n"
                                                 for i, d in enumerate(docs)))
    run_script(nproc, "tools/eval_ppl.py", ["--load", mcore_dir, "--input", str(tmp_path / "docs.jsonl"),
                                            "--output", str(tmp_path / "ppl.jsonl"), "--bucket-size", "32", *flags],
               timeout=600)
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
