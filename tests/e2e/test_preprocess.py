"""tools/preprocess_data.py: text -> .bin/.idx -> tokens, malformed input, atomic output."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT

TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


def _run(assets, *extra, input_path, prefix):
    cmd = [sys.executable, TOOL, "--input", str(input_path), "--output-prefix", str(prefix),
           "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", os.path.join(assets, "llama2/tokenizer.model"),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    return [np.concatenate([ds[j] for j in range(bounds[i], bounds[i + 1])]).tolist() for i in range(len(bounds) - 1)]


@pytest.fixture(scope="module")
def corpus(assets, tmp_path_factory):
    """A few real documents plus a title key, and the expected ids."""
    from megatron.training.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(os.path.join(assets, "llama2/tokenizer.model"), bos=True)
    with open(os.path.join(assets, "shakespeare.jsonl")) as f:
        records = [json.loads(next(f)) for _ in range(5)]
    path = tmp_path_factory.mktemp("corpus") / "plays.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"][:30000], "title": r["title"]}) + "\n" for r in records))
    return path, [tok.tokenize(r["text"][:30000]) + [tok.eod] for r in records], [r["title"] for r in records]


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip(assets, corpus, tmp_path, workers):
    path, expected, titles = corpus
    proc = _run(assets, "--append-eod", "--workers", str(workers), "--json-keys", "text", "title",
                input_path=path, prefix=tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "done: 5 documents" in proc.stdout and "0 lines skipped" in proc.stdout
    assert "docs/s" in proc.stderr  # the progress line with throughput
    assert _documents(str(tmp_path / "out_text_document")) == expected
    assert len(_documents(str(tmp_path / "out_title_document"))) == 5
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_malformed_lines_are_reported_and_skipped_or_fatal(assets, corpus, tmp_path):
    path, expected, _ = corpus
    good = path.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], "{not json", json.dumps({"title": "no text"}), good[1],
                              json.dumps({"text": 42}), "[1, 2]", good[2]]) + "\n")
    proc = _run(assets, "--append-eod", input_path=bad, prefix=tmp_path / "skip")
    assert proc.returncode == 0, proc.stderr
    for line, reason in ((2, "invalid JSON"), (3, "missing key 'text'"), (5, "key 'text' is int, not a string"), (6, "expected a JSON object")):
        assert f"bad.jsonl:{line}: {reason}" in proc.stderr, proc.stderr
    assert "done: 3 documents" in proc.stdout and "4 lines skipped" in proc.stdout
    assert "skipped lines: 2 (invalid JSON" in proc.stdout
    assert _documents(str(tmp_path / "skip_text_document")) == expected[:3]

    proc = _run(assets, "--on-malformed", "fail", input_path=bad, prefix=tmp_path / "fail")
    assert proc.returncode == 1
    assert "bad.jsonl:2: invalid JSON" in proc.stderr and "(stopping)" in proc.stderr
    assert not any(p.startswith("fail") for p in os.listdir(tmp_path)), "a failed run must leave nothing"


def test_interrupted_run_leaves_no_dataset(assets, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(os.path.join(assets, "stdlib.jsonl")) as src:
        big.write_text(src.read() * 3)
    proc = subprocess.Popen([sys.executable, TOOL, "--input", str(big), "--output-prefix", str(tmp_path / "cut"),
                             "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                             os.path.join(assets, "llama2/tokenizer.model")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(".tmp-" in p for p in os.listdir(tmp_path)):
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = os.listdir(tmp_path)
    assert not any(p.endswith((".bin", ".idx")) for p in names), names


def test_missing_tokenizer_file_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--input", "x.jsonl", "--output-prefix", str(tmp_path / "o"),
                           "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "nope.model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.model does not exist" in proc.stderr
