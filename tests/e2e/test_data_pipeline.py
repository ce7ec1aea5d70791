"""Real data through the FPDT layout: the loss of the same batches with FPDT on and off.

GPT-2 BPE tokens of Python's standard library sources, preprocessed into two
.bin/.idx datasets and blended 30/70, with ``--eod-mask-loss`` and
``--reset-position-ids`` (learned absolute positions): the baseline on one
process and FPDT size 2 (offload on) must log the same losses.
"""

import os

import pytest

from tests.helpers import run_pretrain, run_script


@pytest.fixture(scope="module")
def datasets(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    with open(os.path.join(assets, "stdlib.jsonl")) as f:
        lines = f.readlines()[:120]
    prefixes = []
    for name, part in (("a", lines[:60]), ("b", lines[60:])):
        (out / f"{name}.jsonl").write_text("".join(part))
        run_script(1, "tools/preprocess_data.py", ["--input", str(out / f"{name}.jsonl"), "--output-prefix",
                                                    str(out / name), "--tokenizer-type", "GPT2BPETokenizer",
                                                    "--vocab-file", os.path.join(assets, "gpt2/vocab.json"),
                                                    "--merge-file", os.path.join(assets, "gpt2/merges.txt"),
                                                    "--append-eod"], timeout=600)
        prefixes.append(str(out / f"{name}_text_document"))
    return prefixes


def _train(assets, tmp_path, name, nproc, prefixes, extra):
    args = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "256",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3",
            "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "4", "--attention-dropout", "0",
            "--hidden-dropout", "0", "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", os.path.join(assets, "gpt2/vocab.json"), "--merge-file",
            os.path.join(assets, "gpt2/merges.txt"), "--data-path", "0.3", prefixes[0], "0.7", prefixes[1],
            "--split", "90,10,0", "--data-cache-path", str(tmp_path / f"cache_{name}"), "--eod-mask-loss",
            "--reset-position-ids", *extra]
    return run_pretrain(tmp_path, name, nproc, args, script="pretrain_gpt.py")


def test_real_data_loss_is_the_same_with_fpdt_on_and_off(assets, datasets, tmp_path):
    baseline, out = _train(assets, tmp_path, "baseline", 1, datasets, [])
    fpdt, _ = _train(assets, tmp_path, "fpdt", 2, datasets,
                     ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "64", "--fpdt-offload"])
    assert len(baseline) == len(fpdt) == 4
    for b, f in zip(baseline, fpdt):
        assert f["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-5), (b, f)
    assert fpdt[-1]["val_loss"] == pytest.approx(baseline[-1]["val_loss"], rel=2e-5)
    assert "validation loss at iteration 4" in out
