"""Fault injection on datasets: a .bin and .idx that are not one dataset, damaged files, token ids
the tokenizer does not have. Each is refused at start (and by ``--dry-run``) with one line naming
the file and what to change, exit 2, printed once; nothing trains on the wrong bytes."""

from __future__ import annotations

import os

import numpy
import pytest

from megatron.training.data import check_dataset_files, largest_token_ids, tokens_beyond_vocabulary
from tests.helpers import TINY, assert_no_worker_traceback, run_pretrain, run_script


pytestmark = pytest.mark.fault  # the fault-injection tier (pytest -m fault)


def _write(prefix: str, documents, dtype=numpy.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(numpy.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def _documents(seed: int, num_docs: int, top: int):
    rng = numpy.random.default_rng(seed)
    return [rng.integers(0, top, size=int(rng.integers(20, 200))) for _ in range(num_docs)]


@pytest.fixture
def two(tmp_path):
    a = _write(str(tmp_path / "a"), _documents(0, 40, 250))
    b = _write(str(tmp_path / "b"), _documents(1, 40, 250))
    return a, b


def test_a_consistent_pair_passes(two):
    assert check_dataset_files(two[0]) is None


@pytest.mark.parametrize("damage,says", [
    ("other_bin", "the two files are not one dataset"),
    ("truncated_bin", "the two files are not one dataset"),
    ("random_idx", "not a Megatron dataset index (bad header)"),
    ("truncated_idx", "is not a readable Megatron dataset index"),
    ("trailing_idx", "(truncated or altered)"),
    ("empty_idx", "bad header"),
    ("bad_offsets", "inconsistent sequence offsets"),
])
def test_damaged_or_mismatched_files_are_named(two, damage, says):
    a, b = two
    idx, bin_ = a + ".idx", a + ".bin"
    if damage == "other_bin":
        os.replace(b + ".bin", bin_)
    elif damage == "truncated_bin":
        os.truncate(bin_, os.path.getsize(bin_) - 2)
    elif damage == "random_idx":
        open(idx, "wb").write(numpy.random.default_rng(3).bytes(os.path.getsize(idx)))
    elif damage == "truncated_idx":
        os.truncate(idx, os.path.getsize(idx) - 16)
    elif damage == "trailing_idx":
        open(idx, "ab").write(b"\0" * 8)
    elif damage == "empty_idx":
        open(idx, "wb").close()
    elif damage == "bad_offsets":  # the second sequence pointer moved by one token
        data = bytearray(open(idx, "rb").read())
        count = int.from_bytes(data[18:26], "little")
        at = 34 + 4 * count + 8
        data[at:at + 8] = (int.from_bytes(data[at:at + 8], "little") + 2).to_bytes(8, "little")
        open(idx, "wb").write(bytes(data))
    problem = check_dataset_files(a)
    assert problem is not None and says in problem and a in problem, problem


def test_the_largest_token_id_is_found_whichever_part_holds_it(tmp_path):
    docs = _documents(2, 30, 100)
    docs[17][5] = 4321
    prefix = _write(str(tmp_path / "c"), docs)
    for parts in (1, 2, 3, 7):
        assert max(largest_token_ids([prefix], p, parts)[0] for p in range(parts)) == 4321
    assert tokens_beyond_vocabulary([prefix], [4321], 4322) is None
    assert "holds token id 4321, and the tokenizer has 4321 tokens" in tokens_beyond_vocabulary([prefix], [4321], 4321)


def _flags(prefix, vocab):
    flags = list(TINY)
    at = flags.index("--mock-data")
    del flags[at]
    return [*flags, "--vocab-size", str(vocab), "--tokenizer-type", "NullTokenizer", "--data-path", prefix,
            "--split", "100,0,0", "--train-iters", "2"]


def test_training_and_dry_run_refuse_a_mismatched_pair_once(two, tmp_path):
    a, b = two
    os.replace(b + ".bin", a + ".bin")
    for nproc, extra, rc in ((2, [], 1), (1, ["--dry-run"], 2)):  # torchrun exits 1 when its workers exit 2
        proc = run_script(nproc, "pretrain_gpt.py", [*_flags(a, 256), *extra], expect_rc=rc, timeout=600)
        out = proc.stdout + proc.stderr
        assert out.count("the two files are not one dataset") == 1, out
        assert_no_worker_traceback(out)


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tmp_path):
    docs = _documents(4, 40, 200)
    docs[-1][-1] = 300  # in the last part of the .bin: rank 1 finds it
    prefix = _write(str(tmp_path / "d"), docs)
    proc = run_script(1, "pretrain_gpt.py", [*_flags(prefix, 256), "--dry-run"], expect_rc=2)
    assert "holds token id 300, and the tokenizer has 256 tokens" in proc.stderr
    rows, out = run_pretrain(tmp_path, "beyond", 2, _flags(prefix, 256), script="pretrain_gpt.py", expect_rc=1)
    assert rows == [] and out.count("holds token id 300") == 1, out
    assert_no_worker_traceback(out)
    rows, _ = run_pretrain(tmp_path, "fits", 2, _flags(prefix, 301), script="pretrain_gpt.py")
    assert [r["iteration"] for r in rows] == [1, 2]


def test_a_split_that_leaves_validation_without_documents_is_one_line(tmp_path):
    prefix = _write(str(tmp_path / "few"), _documents(5, 6, 250))
    flags = [*_flags(prefix, 256), "--split", "98,2,0", "--eval-iters", "1", "--eval-interval", "2"]
    proc = run_script(1, "pretrain_gpt.py", [*flags, "--dry-run"], expect_rc=2)
    message = f"{prefix} has 6 documents, which leaves the validation split empty under --split 98,2,0"
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_script(2, "pretrain_gpt.py", flags, expect_rc=1)
    out = proc.stdout + proc.stderr
    assert out.count(message) == 1, out
    assert_no_worker_traceback(out)


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer", "swapped"])
def test_unreadable_tokenizer_files_are_named(assets, tmp_path, kind):
    from megatron.training.arguments import ArgumentError, parse_args, validate_args

    garbage = tmp_path / "garbage"
    garbage.write_bytes(numpy.random.default_rng(5).bytes(2000))
    merges = os.path.join(assets, "gpt2/merges.txt")
    if kind == "GPT2BPETokenizer":
        flags, named = ["--vocab-file", str(garbage), "--merge-file", merges], str(garbage)
    elif kind == "Llama2Tokenizer":
        flags, named = ["--tokenizer-model", str(garbage)], str(garbage)
    elif kind == "HuggingFaceTokenizer":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
        flags, named = ["--tokenizer-model", str(tmp_path / "hf")], str(tmp_path / "hf" / "tokenizer.json")
    else:  # a GPT-2 vocabulary given as a SentencePiece model
        kind, flags = "Llama2Tokenizer", ["--tokenizer-model", os.path.join(assets, "gpt2/vocab.json")]
        named = flags[1]
    with pytest.raises(ArgumentError, match=f"cannot load the {kind} tokenizer from {named}"):
        validate_args(parse_args([*TINY, "--train-iters", "2", "--tokenizer-type", kind, *flags]), world_size=1)
