"""Context extension end to end, as a user runs it (docs/STAGES.md, examples/llama3.1_8b_context_extension.sh):

a tiny Llama-3.1-style Hugging Face model (``rope_scaling`` of type llama3, a 64-token context,
the real Llama-2 SentencePiece vocabulary) -> tools/checkpoint/convert.py -> stage 1: 4x its
context (256 tokens) with FPDT on 2 processes, on real text -> stage 2: ``--finetune`` at 512
tokens with another chunk size -> export (sharded safetensors, the run's tokenizer) ->
transformers loads model and tokenizer without edits: the same token ids as ours, and logits equal
to our FPDT model's at every position up to 512 (fp32, <= 1e-4) -> tools/eval_passkey.py on 2
processes, at up to 1024 tokens (16x the original context, 2x stage 2's): each sample's answer
log-probability and retrieval equal transformers' on the same ids.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

from fpdt_ext.testing.spawn import run_world
from tests.helpers import run_pretrain, run_script

transformers = pytest.importorskip("transformers")

ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
         "--norm-epsilon", "1e-5", "--rotary-base", "500000", "--use-rope-scaling", "--rope-scaling-factor", "4",
         "--rope-scaling-low-freq-factor", "1", "--rope-scaling-high-freq-factor", "4",
         "--rope-scaling-original-max-position-embeddings", "16", "--attention-dropout", "0", "--hidden-dropout", "0"]
LONG = 512


@pytest.fixture(scope="module")
def extended(assets, tmp_path_factory):
    """Every step of the workflow once: {"hf": the original, "stage1", "stage2": checkpoints, "export": the HF folder}."""
    tmp = tmp_path_factory.mktemp("extension")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(ROPE),
                                      initializer_range=0.1)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp / "hf"))
    run_script(1, "tools/checkpoint/convert.py", ["--model-type", "llama", "--loader", "hf", "--saver", "mcore",
                                                  "--load-dir", str(tmp / "hf"), "--save-dir", str(tmp / "converted")])
    with open(os.path.join(assets, "shakespeare.jsonl")) as f:
        (tmp / "plays.jsonl").write_text("".join(f.readlines()[:6]))
    tokenizer = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", os.path.join(assets, "llama2",
                                                                                           "tokenizer.model")]
    run_script(1, "tools/preprocess_data.py", ["--input", str(tmp / "plays.jsonl"), "--output-prefix",
                                               str(tmp / "plays"), *tokenizer, "--append-eod"], timeout=600)
    common = [*MODEL, *tokenizer, "--data-path", str(tmp / "plays_text_document"), "--split", "70,30,0",
              "--data-cache-path", str(tmp / "cache"), "--micro-batch-size", "1", "--global-batch-size", "2",
              "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
              "--fpdt", "--fpdt-parallel-size", "2", "--fpdt-offload"]
    stage1, _ = run_pretrain(tmp, "stage1", 2, [*common, "--seq-length", "256", "--fpdt-chunk-size", "64",
                                                "--train-iters", "3", "--eval-interval", "3",
                                                "--load", str(tmp / "converted"), "--save", str(tmp / "stage1")])
    stage2, out2 = run_pretrain(tmp, "stage2", 2, [*common, "--seq-length", str(LONG), "--fpdt-chunk-size", "128",
                                                   "--train-iters", "2", "--eval-interval", "2", "--finetune",
                                                   "--load", str(tmp / "stage1"), "--save", str(tmp / "stage2")])
    assert [r["iteration"] for r in stage1] == [1, 2, 3] and [r["iteration"] for r in stage2] == [1, 2], out2
    exported = run_script(1, "tools/checkpoint/convert.py", ["--model-type", "llama", "--loader", "mcore", "--saver",
                                                             "hf", "--load-dir", str(tmp / "stage2"), "--save-dir",
                                                             str(tmp / "export"), "--max-shard-size", "3MB"]).stdout
    return {"tmp": tmp, "stage2": tmp / "stage2", "export": tmp / "export", "convert_out": exported,
            "tokenizer": os.path.join(assets, "llama2", "tokenizer.model")}


def _opts(load, nproc):
    return types.SimpleNamespace(load=str(load), tensor_model_parallel_size=1, fpdt=True, fpdt_parallel_size=nproc,
                                 fpdt_chunk_size=128, fpdt_offload=True)


def fpdt_logits_worker(rank, world_size, load, tokens):
    """Our stage-2 model's logits on the FPDT layout of ``world_size`` ranks, gathered: [1, s, V]."""
    from fpdt_ext.core.layout import fpdt_unshard
    from tools.eval_common import build_eval_model, local_batch, local_chunks, open_checkpoint

    opts = _opts(load, world_size)
    ckpt = open_checkpoint(opts)
    model, groups = build_eval_model(opts, ckpt, tokens.shape[1])
    batch = local_batch(opts, groups, tokens[0].tolist(), tokens[0].tolist(), tokens.shape[1])
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)[..., :ckpt.vocab].contiguous()  # [1, s/P, V]
    pieces = [torch.empty_like(logits) for _ in range(world_size)]
    torch.distributed.all_gather(pieces, logits, group=groups.sp)
    return fpdt_unshard(pieces, dim=1, num_chunks=local_chunks(opts, tokens.shape[1]))


def test_the_export_is_a_complete_hugging_face_folder(extended):
    folder = extended["export"]
    names = sorted(os.listdir(folder))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names and "tokenizer.json" in names, names
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"] == ROPE and config["max_position_embeddings"] >= LONG
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    assert f"wrote {len(shards)} weight files" in extended["convert_out"]


def test_transformers_tokenizes_and_computes_as_we_do_at_8x_the_original_context(extended):
    from megatron.training.tokenizer import SentencePieceTokenizer

    ours = SentencePieceTokenizer(extended["tokenizer"], bos=True)
    theirs = transformers.AutoTokenizer.from_pretrained(str(extended["export"]))
    text = ("O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; 1234 été\n  ") * 40
    ids = ours.tokenize(text)
    assert theirs(text)["input_ids"] == ids
    tokens = torch.tensor([ids[:LONG]])
    assert tokens.shape[1] == LONG
    model = transformers.AutoModelForCausalLM.from_pretrained(str(extended["export"]), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(tokens).logits
    ours_logits = run_world(2, fpdt_logits_worker, str(extended["stage2"]), tokens)[0]
    assert ours_logits.shape == expected.shape
    err = (ours_logits - expected).abs().max().item()
    assert err <= 1e-4, err
    late = (ours_logits[0, 400:] - expected[0, 400:]).abs().max().item()
    assert late <= 1e-4 and expected[0, 400:].abs().max() > 1e-2  # positions far past the original 64


def test_pass_key_retrieval_on_fpdt_matches_transformers(extended, tmp_path):
    from megatron.training.tokenizer import SentencePieceTokenizer
    from tools.eval_passkey import build_sample

    out = tmp_path / "passkey.jsonl"
    proc = run_script(2, "tools/eval_passkey.py", ["--load", str(extended["stage2"]), "--lengths", "256", "1024",
                                                   "--depths", "0", "0.5", "1", "--samples", "1",
                                                   "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "128",
                                                   "--fpdt-offload", "--output", str(out), "--plot",
                                                   str(tmp_path / "passkey.svg"), "--seed", "7"])
    [line] = [line for line in proc.stderr.splitlines() if "%|" in line]  # progress: rank 0's only, of 2
    assert line.startswith("eval_passkey: 100%|") and "| 6/6 [" in line and "sample/s" in line, line
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    samples, summary = rows[:-1], rows[-1]
    assert len(samples) == 6 and summary["samples"] == 6 and {r["length"] for r in samples} == {256, 1024}
    assert "| length | depth 0 | depth 0.5 | depth 1 | all |" in proc.stdout
    svg = (tmp_path / "passkey.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") == 6

    ours = SentencePieceTokenizer(extended["tokenizer"], bos=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(extended["export"]), dtype=torch.float32).eval()
    for row in samples:
        ids, answer = build_sample(ours, row["length"], row["depth"], row["key"])
        assert len(ids) - 1 == row["tokens"] <= row["length"] and answer >= 1
        assert ours.detokenize(ids[-answer:]).strip() == row["key"]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0, -answer:].double()
        target = torch.tensor(ids[-answer:])
        logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
        hits = int((logits.argmax(-1) == target).sum())
        assert row["key_logprob"] == pytest.approx(logprob, abs=1e-4), row
        assert row["token_accuracy"] == hits / answer and row["retrieved"] == (hits == answer)
    cells = {(c["length"], c["depth"]): c["accuracy"] for c in summary["cells"]}
    for row in samples:
        assert cells[(row["length"], row["depth"])] == float(row["retrieved"])
