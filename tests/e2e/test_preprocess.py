"""tools/preprocess_data.py: text -> .bin/.idx -> tokens, malformed input, atomic output, user errors."""

import json
import os
import signal
import socket
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


NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]  # text is space-separated ids in [0, 100)


def _main(input_path, prefix, *extra, tokenizer=NULL):
    """The tool in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from tools.preprocess_data import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--input", str(input_path), "--output-prefix", str(prefix), *map(str, [*tokenizer, *extra])])
    return rc, out.getvalue(), err.getvalue()


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


@pytest.mark.fault
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
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"preprocess_data.py: error: {bad}:2: invalid JSON (Expecting property "
                                                f"name enclosed in double quotes at column 2) (--on-malformed fail: "
                                                f"nothing written; fix the line or pass --on-malformed skip)"]
    assert not any(p.startswith("fail") for p in os.listdir(tmp_path)), "a failed run must leave nothing"


@pytest.mark.fault
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
    assert any(".tmp-" in p for p in names), names  # the killed run's temporary files stay behind ...

    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "1 2 3"}\n')
    rc, _, err = _main(small, tmp_path / "cut")  # ... until a run of the same prefix starts
    assert rc == 0 and "left by an interrupted run" in err, err
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl", "cut_text_document.bin", "cut_text_document.idx",
                                            "small.jsonl"]


@pytest.mark.fault
def test_missing_tokenizer_file_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--input", "x.jsonl", "--output-prefix", str(tmp_path / "o"),
                           "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "nope.model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.model does not exist" in proc.stderr


@pytest.mark.fault
def test_undecodable_lines_are_reported_skipped_and_counted(assets, corpus, tmp_path):
    """Invalid UTF-8 (and a JSON-escaped lone surrogate) is a malformed line, not replacement characters."""
    path, expected, _ = corpus
    good = path.read_bytes().splitlines()
    bad_utf8 = good[1][:20] + b"\xff\xfe" + good[1][20:]
    surrogate = json.dumps({"text": "a lone \ud800 surrogate"}).encode()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join([good[0], bad_utf8, good[2], surrogate, good[3]]) + b"\n")
    llama = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", os.path.join(assets, "llama2/tokenizer.model")]
    rc, out, err = _main(bad, tmp_path / "skip", "--append-eod", tokenizer=llama)
    assert rc == 0, err
    assert f"{bad}:2: invalid UTF-8 (byte 0xff at byte 21 of the line) (skipped)" in err
    assert f"{bad}:4: key 'text' holds a lone surrogate ('\\ud800') (skipped)" in err
    assert "done: 3 documents" in out and "2 lines skipped (1 invalid UTF-8, 1 invalid Unicode)" in out
    assert _documents(str(tmp_path / "skip_text_document")) == [expected[0], expected[2], expected[3]]

    rc, out, err = _main(bad, tmp_path / "fail", "--on-malformed", "fail", tokenizer=llama)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"preprocess_data.py: error: {bad}:2: invalid UTF-8 (byte 0xff at byte 21 of "
                                        f"the line) (--on-malformed fail: nothing written; fix the line or pass "
                                        f"--on-malformed skip)"]
    assert not any(p.startswith("fail") for p in os.listdir(tmp_path))


@pytest.mark.fault
@pytest.mark.parametrize("ids,bad_id", [("3 100", 100), ("-1 4", -1)], ids=["too-large", "negative"])
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, ids, bad_id):
    """Written, they would index past the embedding table (or wrap around in the .bin's dtype)."""
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"text": "1 2 3"}) + "\n" + json.dumps({"text": ids}) + "\n")
    rc, out, err = _main(data, tmp_path / "out")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"preprocess_data.py: error: {data}:2: key 'text' has token id {bad_id}, "
                                        f"outside the tokenizer's vocabulary [0, 100); raise --vocab-size above the "
                                        f"largest id; nothing written"]
    assert os.listdir(tmp_path) == ["ids.jsonl"]


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.fault
def test_stale_temporary_files_of_the_prefix_are_removed_and_nothing_else(tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"text": "1 2 3"}) + "\n")
    tag = f"tmp-{_dead_pid()}-{socket.gethostname()}"
    stale = [f"out_text_document.bin.{tag}", f"out_text_document.idx.{tag}"]
    kept = [f"other_text_document.bin.{tag}",  # another prefix's
            "out_text_document.bin.tmp-notes", "out_text_document.bin.bak"]  # not our temporary names
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    rc, _, err = _main(data, tmp_path / "out")
    assert rc == 0, err
    for name in stale:
        assert f"removed {tmp_path / name}, left by an interrupted run" in err
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["ids.jsonl", "out_text_document.bin",
                                                          "out_text_document.idx"])


@pytest.mark.fault
@pytest.mark.parametrize("writer", ["this host", "another host"])
def test_temporary_files_of_a_live_writer_stop_the_run(tmp_path, writer):
    """A run still writing the same outputs (a live process: this test's parent), or one on another host
    of a shared file system, whose liveness cannot be known: refused, its file left alone."""
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"text": "1 2 3"}) + "\n")
    pid, host = (os.getppid(), socket.gethostname()) if writer == "this host" else (_dead_pid(), "node-elsewhere")
    temp = tmp_path / f"out_text_document.bin.tmp-{pid}-{host}"
    temp.write_bytes(b"partial")
    rc, _, err = _main(data, tmp_path / "out")
    assert rc == 2
    assert err.strip().splitlines() == [f"preprocess_data.py: error: --output-prefix {tmp_path / 'out'}: another "
                                        f"preprocess_data.py (pid {pid} on {host}) is writing {temp}; wait for it "
                                        f"or choose another prefix (delete that file if that run is gone)"]
    assert sorted(os.listdir(tmp_path)) == ["ids.jsonl", temp.name]


def _input_errors(tmp_path):
    """{case: (input, output prefix, extra flags, the error's text after "error: ")}."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "1 2 3"}) + "\n")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "plain.txt").write_text("just some text\nmore text\n")
    (tmp_path / "other_key.jsonl").write_text(json.dumps({"body": "1 2"}) + "\n" + json.dumps({"body": "3"}) + "\n")
    (tmp_path / "all_bad.jsonl").write_text(json.dumps({"text": "1 x"}) + "\n")
    (tmp_path / "tok.model").write_text("not a sentencepiece model")
    out = tmp_path / "out" / "o"
    return {
        "missing input": (tmp_path / "nope.jsonl", out, [], f"--input {tmp_path / 'nope.jsonl'} does not exist"),
        "input is a directory": (tmp_path, out, [], f"--input {tmp_path} is a directory, not a file"),
        "empty input": (tmp_path / "empty.jsonl", out, [], f"--input {tmp_path / 'empty.jsonl'}: none of its first 2 "
                        f"lines is a JSON object (all blank); it must hold JSON lines, one {{\"text\": \"...\"}} "
                        f"object per line"),
        "not JSON lines": (tmp_path / "plain.txt", out, [], f"--input {tmp_path / 'plain.txt'}: none of its first 2 "
                           f"lines is a JSON object (line 1: invalid JSON (Expecting value at column 1)); it must hold "
                           f"JSON lines, one {{\"text\": \"...\"}} object per line"),
        "wrong --json-keys": (tmp_path / "other_key.jsonl", out, [], f"--input {tmp_path / 'other_key.jsonl'}: none of "
                              f"its first 2 lines has 'text' (keys found: 'body'); set --json-keys to the keys to "
                              f"tokenize"),
        "unwritable output": (good, tmp_path / "a_file" / "o", [], f"--output-prefix {tmp_path / 'a_file' / 'o'}: "
                              f"cannot write in {tmp_path / 'a_file'} (File exists); choose a writable directory"),
        "no workers": (good, out, ["--workers", "0"], "--workers 0 must be at least 1"),
        "tokenizer of another format": (good, out, ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                                                    tmp_path / "tok.model"],
                                        f"cannot load a Llama2Tokenizer from {tmp_path / 'tok.model'} (INTERNAL: could "
                                        f"not parse ModelProto from {tmp_path / 'tok.model'}); check --tokenizer-type "
                                        f"and the files it is given"),
        "no document": (tmp_path / "all_bad.jsonl", out, [], f"--input {tmp_path / 'all_bad.jsonl'}: no document to "
                        f"write: all 1 lines skipped (first: line 1: cannot tokenize key 'text': invalid literal for "
                        f"int() with base 10: 'x'); nothing written"),
    }


@pytest.mark.fault
@pytest.mark.parametrize("case", ["missing input", "input is a directory", "empty input", "not JSON lines",
                                  "wrong --json-keys", "unwritable output", "no workers", "tokenizer of another format",
                                  "no document"])
def test_input_errors_are_one_line_and_exit_code_2(tmp_path, monkeypatch, case):
    """Before the tokenizer is loaded where the input shows them; nothing written. (With no document
    left, the lines skipped were reported first.)"""
    import tools.preprocess_data as tool

    input_path, prefix, extra, message = _input_errors(tmp_path)[case]
    tokenizer = NULL
    if "--tokenizer-type" in extra:
        tokenizer, extra = extra, []
    elif case != "no document":
        monkeypatch.setattr(tool, "build_tokenizer", lambda args: pytest.fail("the tokenizer was loaded"))
    rc, out, err = _main(input_path, prefix, *extra, tokenizer=tokenizer)
    assert rc == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"preprocess_data.py: error: {message}" and (len(lines) == 1 or case == "no document"), lines
    written = [name for _, _, names in os.walk(tmp_path) for name in names if name.startswith("o_")]
    assert not written


@pytest.mark.fault
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_input_is_one_line_and_exit_code_2(tmp_path):
    data = tmp_path / "secret.jsonl"
    data.write_text(json.dumps({"text": "1"}) + "\n")
    data.chmod(0)
    rc, _, err = _main(data, tmp_path / "o")
    assert rc == 2 and err.strip() == f"preprocess_data.py: error: --input {data} cannot be read (Permission denied)"
