"""tools/eval_ppl.py's user errors: one line on stderr (rank 0 only), exit code 2, before the model is built.

In this process: the flag and input checks run before the checkpoint is read (the test makes the
distributed start-up fail if they do not); the checks that need the checkpoint's vocabulary run
on a stand-in checkpoint and must come before ``build_model``, which the test makes fail.
"""

import json
import os
from unittest import mock

import pytest


pytestmark = pytest.mark.fault  # the fault-injection tier (pytest -m fault)


@pytest.fixture
def env():
    """A clean launcher environment, restored afterwards (a world of one sets RANK and WORLD_SIZE),
    and no process group left behind."""
    import torch.distributed as dist

    with mock.patch.dict(os.environ):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(name, None)
        yield os.environ
    if dist.is_initialized():
        dist.destroy_process_group()


def _main(capsys, *argv):
    """(exit code, stdout, stderr) of eval_ppl.py in this process."""
    from tools.eval_ppl import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _write(path, *lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def _cases(tmp_path):
    """{case: (input lines, flags, launcher environment, message)} of errors found before the checkpoint is read;
    the flags replace or add to --load, --input and --output."""
    doc = json.dumps({"tokens": [1, 2, 3]})
    docs = tmp_path / "docs.jsonl"
    return {
        "missing --load": ([doc], {"--load": tmp_path / "nope"}, {}, f"--load {tmp_path / 'nope'} does not exist"),
        "--load is a file": ([doc], {"--load": docs}, {}, f"--load {docs} is a file; give the checkpoint directory"),
        "missing --input": ([doc], {"--input": tmp_path / "nope.jsonl"}, {},
                            f"--input {tmp_path / 'nope.jsonl'} does not exist"),
        "invalid JSON": ([doc, "{oops"], {}, {}, f"--input {docs}:2: invalid JSON (Expecting property name enclosed in "
                                                 f"double quotes at column 2)"),
        "invalid UTF-8": ([doc, b'{"text": "caf\xe9"}'], {}, {},
                          f"--input {docs}:2: invalid UTF-8 (byte 0xe9 at byte 14)"),
        "not an object": (["[1, 2]"], {}, {}, f"--input {docs}:1: expected a JSON object, got list"),
        "tokens not ids": ([doc, json.dumps({"tokens": [1, 2.5]})], {}, {},
                           f"--input {docs}:2: 'tokens' must be a list of integer ids"),
        "text not a string": ([json.dumps({"text": ["a"]})], {}, {}, f"--input {docs}:1: 'text' is list, not a string"),
        "no text key": ([json.dumps({"body": "a b"})], {}, {},
                        f"--input {docs}:1: needs 'text' or 'tokens' (--json-key names the text's key)"),
        "no document": (["", "  "], {}, {}, f"--input {docs} holds no document"),
        "chunk not split by FPDT": ([doc], {"--fpdt": None, "--fpdt-parallel-size": 2, "--fpdt-chunk-size": 33},
                                    {"WORLD_SIZE": "2"}, "--fpdt-chunk-size 33 is not a multiple of "
                                                         "--fpdt-parallel-size 2 (each chunk is split over the FPDT "
                                                         "ranks)"),
        "FPDT flags without --fpdt": ([doc], {"--fpdt-chunk-size": 32}, {},
                                      "--fpdt-parallel-size, --fpdt-chunk-size and --fpdt-offload need --fpdt"),
        "processes not TP x FPDT": ([doc], {"--fpdt": None, "--fpdt-parallel-size": 2}, {},
                                    "eval_ppl.py runs one sequence at a time on TP x FPDT x PP = 2 processes; launch 2, not 1"),
        "zero bucket": ([doc], {"--bucket-size": 0}, {}, "--bucket-size 0 must be positive"),
        "output folder missing": ([doc], {"--output": tmp_path / "no" / "ppl.jsonl"}, {},
                                  f"--output {tmp_path / 'no' / 'ppl.jsonl'} cannot be written ({tmp_path / 'no'} "
                                  f"does not exist)"),
    }


CASES = ["missing --load", "--load is a file", "missing --input", "invalid JSON", "invalid UTF-8", "not an object",
         "tokens not ids", "text not a string", "no text key", "no document", "chunk not split by FPDT",
         "FPDT flags without --fpdt", "processes not TP x FPDT", "zero bucket", "output folder missing"]


@pytest.mark.parametrize("case", CASES)
def test_flag_and_input_errors_stop_before_the_checkpoint_is_read(tmp_path, capsys, env, case):
    import fpdt_ext.runtime

    lines, flags, launcher_env, message = _cases(tmp_path)[case]
    env.update(launcher_env)
    (tmp_path / "ckpt").mkdir()
    flags = {"--load": tmp_path / "ckpt", "--input": _write(tmp_path / "docs.jsonl", *lines),
             "--output": tmp_path / "ppl.jsonl", **flags}
    argv = [x for flag, value in flags.items() for x in ([flag] if value is None else [flag, value])]
    with mock.patch.object(fpdt_ext.runtime, "init_distributed", side_effect=AssertionError("started")):
        rc, out, err = _main(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.splitlines() == [f"eval_ppl.py: error: {message}"]
    assert not (tmp_path / "ppl.jsonl").exists()


def test_only_rank_0_prints(tmp_path, capsys, env):
    """Under torchrun every rank finds the same mistake; one line is printed, by rank 0."""
    argv = ["--load", tmp_path, "--input", tmp_path / "nope.jsonl", "--output", tmp_path / "ppl.jsonl"]
    env.update(RANK="1", WORLD_SIZE="1")
    assert _main(capsys, *argv) == (2, "", "")
    with pytest.raises(SystemExit, match="2"):
        _main(capsys, "--load", tmp_path)  # argparse's errors too
    assert capsys.readouterr() == ("", "")
    env.update(RANK="0")
    assert _main(capsys, *argv) == (2, "", f"eval_ppl.py: error: --input {tmp_path / 'nope.jsonl'} does not exist\n")


@pytest.mark.parametrize("layout", ["empty folder", "unfinished checkpoint"])
def test_no_usable_checkpoint_is_one_line(tmp_path, capsys, env, layout):
    load = tmp_path / "ckpt"
    load.mkdir()
    if layout == "unfinished checkpoint":
        (load / "iter_0000010").mkdir()
    docs = _write(tmp_path / "docs.jsonl", json.dumps({"tokens": [1, 2, 3]}))
    rc, _, err = _main(capsys, "--load", load, "--input", docs, "--output", tmp_path / "ppl.jsonl")
    reason = "no iter_* directory" if layout == "empty folder" else \
        f"{load / 'iter_0000010'}: manifest.json is missing (the save did not finish)"
    assert rc == 2
    assert err.splitlines() == [f"eval_ppl.py: error: --load {load}: no usable checkpoint ({reason}); point --load at "
                                f"a training run's --save directory"]


@pytest.fixture
def stand_in_checkpoint(tmp_path, env):
    """A checkpoint of a 256-token vocabulary trained with NullTokenizer, without the weights: the
    checks must fail before ``build_model`` (which fails the test) is reached."""
    import megatron.core.dist_checkpointing
    import megatron.training.checkpointing
    import megatron.training.models

    load = tmp_path / "ckpt"
    load.mkdir()
    common = {"model_args": {"vocab_size": 256, "tokenizer_type": "NullTokenizer"}, "true_vocab_size": 256}
    with mock.patch.object(megatron.training.checkpointing, "newest_usable_checkpoint",
                           return_value=(str(load / "iter_0000001"), [])), \
            mock.patch.object(megatron.core.dist_checkpointing, "load_common_state_dict", return_value=common), \
            mock.patch.object(megatron.training.models, "build_model", side_effect=AssertionError("model built")):
        yield load, common


@pytest.mark.parametrize("line,message", [
    (json.dumps({"tokens": [1, 2, 256]}), "token id 256 is outside the model's vocabulary [0, 256); tokenize with the "
                                          "model's own tokenizer"),
    (json.dumps({"tokens": [-1, 2]}), "token id -1 is outside the model's vocabulary [0, 256); tokenize with the "
                                      "model's own tokenizer"),
    (json.dumps({"text": "5 7 999"}), "token id 999 is outside the model's vocabulary [0, 256); tokenize with the "
                                      "model's own tokenizer"),
    (json.dumps({"text": "5 seven"}), "the NullTokenizer cannot tokenize it (invalid literal for int() with base 10: "
                                      "'seven')"),
], ids=["tokens-too-large", "tokens-negative", "null-tokenizer-text", "null-tokenizer-words"])
def test_ids_outside_the_vocabulary_stop_before_the_model_is_built(tmp_path, capsys, stand_in_checkpoint, line,
                                                                     message):
    load, _ = stand_in_checkpoint
    docs = _write(tmp_path / "docs.jsonl", json.dumps({"tokens": [1, 2, 3]}), line)
    rc, _, err = _main(capsys, "--load", load, "--input", docs, "--output", tmp_path / "ppl.jsonl")
    assert rc == 2
    assert err.splitlines() == [f"eval_ppl.py: error: --input {docs}:2: {message}"]


def test_a_checkpoint_of_another_trainer_is_one_line(tmp_path, capsys, stand_in_checkpoint):
    load, common = stand_in_checkpoint
    common.pop("model_args")
    docs = _write(tmp_path / "docs.jsonl", json.dumps({"tokens": [1, 2, 3]}))
    rc, _, err = _main(capsys, "--load", load, "--input", docs, "--output", tmp_path / "ppl.jsonl")
    assert rc == 2
    assert err.splitlines() == [f"eval_ppl.py: error: --load {load}: {load / 'iter_0000001'} holds no model arguments "
                                f"(not written by this project's training); convert it with "
                                f"tools/checkpoint/convert.py"]


# -- tools/eval_passkey.py: the same flags, and its own ---------------------------------------


def _passkey(capsys, *argv):
    from tools.eval_passkey import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flags,message", [
    (["--depths", "0.5", "1.5"], "--depths 1.5 is outside [0, 1] (0: the key first, 1: last)"),
    (["--fpdt-chunk-size", "64", "--lengths", "100"], "--lengths 100 is not a positive multiple of 64 (the FPDT chunk "
                                                      "size, or the FPDT size, that every sequence is split by)"),
    (["--samples", "0"], "--samples 0 must be positive"),
    (["--plot", "heat.pdf"], "--plot heat.pdf: name a .svg or .png file"),
    (["--fpdt-parallel-size", "2"], "eval_passkey.py runs one sequence at a time on TP x FPDT = 2 processes; launch 2, "
                                    "not 1"),
], ids=["depth", "length", "samples", "plot", "processes"])
def test_passkey_flag_errors_stop_before_the_checkpoint_is_read(tmp_path, capsys, env, flags, message):
    import fpdt_ext.runtime

    (tmp_path / "ckpt").mkdir()
    argv = ["--load", tmp_path / "ckpt", "--lengths", "128", "--output", tmp_path / "pk.jsonl", *flags]
    with mock.patch.object(fpdt_ext.runtime, "init_distributed", side_effect=AssertionError("started")):
        rc, out, err = _passkey(capsys, *argv)
    assert (rc, out) == (2, "")
    assert err.splitlines() == [f"eval_passkey.py: error: {message}"]


def test_passkey_needs_a_text_tokenizer(tmp_path, capsys, stand_in_checkpoint):
    load, _ = stand_in_checkpoint
    rc, _, err = _passkey(capsys, "--load", load, "--lengths", "128", "--output", tmp_path / "pk.jsonl")
    assert rc == 2
    assert err.splitlines() == [f"eval_passkey.py: error: --load {load}: the checkpoint names no text tokenizer; pass "
                                f"--tokenizer-type and its files (the model's own)"]


def test_a_length_too_short_for_the_prompt_is_refused(assets):
    from megatron.training.tokenizer import SentencePieceTokenizer
    from tools.eval_common import UsageError
    from tools.eval_passkey import build_sample

    tokenizer = SentencePieceTokenizer(os.path.join(assets, "llama2", "tokenizer.model"), bos=True)
    with pytest.raises(UsageError, match="--lengths 32 is too short for the prompt alone"):
        build_sample(tokenizer, 32, 0.5, "12345")
    ids, answer = build_sample(tokenizer, 200, 0.5, "12345")
    assert 190 <= len(ids) - 1 <= 200 and tokenizer.detokenize(ids[-answer:]).strip() == "12345"
