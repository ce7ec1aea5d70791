"""Checkpoints: exact resume, faults (kill during save, corruption, SIGTERM), resharding.

Runs are real ``pretrain_llama.py`` processes (FPDT size 2 on 2 gloo processes
unless said otherwise), with hidden dropout on so that RNG restore matters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers import ROOT, TINY, assert_no_worker_traceback, launcher, run_pretrain

MODEL = TINY + ["--lr", "3e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--min-lr", "3e-4",
                "--hidden-dropout", "0.1", "--seed", "11"]
FPDT = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--fpdt-offload"]


def _cmd(nproc, args):
    return [*launcher(nproc), "pretrain_llama.py", *MODEL, *args]


def _kill_tree(pid):
    import psutil

    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        p.kill()


def _run(tmp_path, name, args, nproc=2, expect_rc=0):
    return run_pretrain(tmp_path, name, nproc, MODEL + list(args), expect_rc=expect_rc)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """Losses, gradient norms and validation losses (validation continues where it was, it does
    not restart at sample 0) are those of the uninterrupted run, bit for bit."""
    evaluate = ["--eval-iters", "1", "--eval-interval", "2"]
    straight, _ = _run(tmp_path, "straight", [*FPDT, *evaluate, "--train-iters", "6"])
    first, out = _run(tmp_path, "first", [*FPDT, *evaluate, "--train-iters", "6", "--save", str(tmp_path / "ckpt"),
                                          "--exit-interval", "3"])
    assert [r["iteration"] for r in first] == [1, 2, 3] and "exiting at iteration 3" in out
    second, out = _run(tmp_path, "second", [*FPDT, *evaluate, "--train-iters", "6", "--load", str(tmp_path / "ckpt")])
    assert "loaded checkpoint" in out
    assert [r["iteration"] for r in second] == [4, 5, 6]
    for a, b in zip(straight, first + second):
        assert a["lm_loss"] == b["lm_loss"] and a["grad_norm"] == b["grad_norm"], (a, b)  # bit for bit
        assert a.get("val_loss") == b.get("val_loss"), (a, b)
    assert [r["iteration"] for r in straight if "val_loss" in r] == [2, 4, 6]


def test_distributed_optimizer_checkpoint_resumes_exactly_with_or_without_sharding(tmp_path):
    """Adam state split over the FPDT ranks (--use-distributed-optimizer): each rank saves the
    parameters it owns, and the checkpoint holds the same tensors as an unsharded one, so a
    resume continues bit for bit with the sharded optimizer and with the unsharded one."""
    zero = [*FPDT, "--use-distributed-optimizer", "--train-iters", "6"]
    straight, _ = _run(tmp_path, "straight", zero)
    _run(tmp_path, "first", [*zero, "--save", str(tmp_path / "ckpt"), "--exit-interval", "3"])
    sharded, _ = _run(tmp_path, "sharded", [*zero, "--load", str(tmp_path / "ckpt")])
    unsharded, _ = _run(tmp_path, "unsharded", [*FPDT, "--train-iters", "6", "--load", str(tmp_path / "ckpt")])
    assert [r["iteration"] for r in sharded] == [r["iteration"] for r in unsharded] == [4, 5, 6]
    for a, b, c in zip(straight[3:], sharded, unsharded):
        assert a["lm_loss"] == b["lm_loss"] == c["lm_loss"] and a["grad_norm"] == b["grad_norm"] == c["grad_norm"]


@pytest.mark.fault
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(_cmd(2, [*FPDT, "--train-iters", "200", "--save", str(ckpt), "--save-interval", "1"]),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not staging:  # a save in progress after one was published
            names = os.listdir(ckpt) if ckpt.exists() else []
            if "latest_checkpointed_iteration.txt" in names:
                staging = [n for n in names if ".tmp-" in n]
            time.sleep(0.001)
        _kill_tree(proc.pid)  # torchrun starts its workers in sessions of their own
    finally:
        proc.wait()
    assert staging, "no save was caught in progress"
    names = os.listdir(ckpt)
    assert any(".tmp-" in n for n in names), names  # the interrupted save never became a checkpoint
    published = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert (ckpt / f"iter_{published:07d}" / "manifest.json").exists()
    resumed, out = _run(tmp_path, "resumed", [*FPDT, "--train-iters", str(published + 1), "--lr-decay-iters", "200",
                                              "--load", str(ckpt), "--save", str(ckpt)])
    assert f"(iteration {published}," in out
    assert [r["iteration"] for r in resumed] == [published + 1]
    # the run that took the directory over removed the interrupted save's files
    assert "removed what an interrupted save left" in out
    assert not [n for n in os.listdir(ckpt) if ".tmp" in n], os.listdir(ckpt)


@pytest.mark.fault
def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, "save", [*FPDT, "--train-iters", "4", "--save", str(ckpt), "--save-interval", "2"])
    shard = sorted(p for p in (ckpt / "iter_0000004").iterdir() if p.suffix == ".distcp")[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    rows, out = _run(tmp_path, "resume", [*FPDT, "--train-iters", "5", "--load", str(ckpt)])
    assert f"{shard.name} does not match its sha256 (corrupted)" in out
    assert "iter_0000002 (iteration 2" in out and [r["iteration"] for r in rows] == [3, 4, 5]
    # a truncated shard in one checkpoint, a manifest of valid JSON but no file list in the other:
    # a clear error naming both, no training
    for p in (ckpt / "iter_0000002").iterdir():
        if p.suffix == ".distcp":
            p.write_bytes(p.read_bytes()[:10])
    (ckpt / "iter_0000004" / "manifest.json").write_text('{"iteration": 4}')
    _, out = _run(tmp_path, "none", [*FPDT, "--train-iters", "6", "--load", str(ckpt)], expect_rc=1)
    assert "no usable checkpoint" in out and "truncated or altered" in out
    assert "manifest.json is malformed" in out
    assert_no_worker_traceback(out)


@pytest.mark.fault
def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path):
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "run.jsonl"
    proc = subprocess.Popen(_cmd(1, ["--train-iters", "1000", "--save", str(ckpt), "--exit-signal-handler",
                                     "--loss-log-file", str(log)]),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "exiting at iteration" in out and "SIGTERM received" in out
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    rows, out = _run(tmp_path, "after", ["--train-iters", str(saved + 1), "--load", str(ckpt)], nproc=1)
    assert [r["iteration"] for r in rows] == [saved + 1]


@pytest.mark.fault
def test_sigterm_to_the_whole_process_group_saves_and_exits_cleanly(tmp_path):
    """SIGTERM as SLURM and torchrun deliver it: to every process of the job (the launcher, the
    workers, megatron-core's checkpoint-writer process). The workers finish the iteration and
    save; the checkpoint resumes. (torchrun itself still exits non-zero: it was signalled.)"""
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "run.jsonl"
    # a periodic save first: megatron-core's writer process exists when the signal comes
    proc = subprocess.Popen(_cmd(2, [*FPDT, "--train-iters", "1000", "--save", str(ckpt), "--save-interval", "2",
                                     "--exit-signal-handler", "--loss-log-file", str(log)]),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a job step
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "SIGTERM received" in out and "BrokenPipeError" not in out, out[-3000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 3 and f"saved checkpoint at iteration {saved}" in out
    rows, _ = _run(tmp_path, "after", [*FPDT, "--train-iters", str(saved + 1), "--load", str(ckpt)])
    assert [r["iteration"] for r in rows] == [saved + 1]


@pytest.mark.fault
def test_a_second_run_cannot_save_into_a_directory_in_use_and_a_killed_run_frees_it(tmp_path):
    """Two runs saving into one --save would replace each other's checkpoints: the second is refused
    before it builds anything; once the first is killed (no clean exit), the directory is free."""
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "first.jsonl"
    first = subprocess.Popen(_cmd(1, ["--train-iters", "1000", "--save", str(ckpt), "--save-interval", "1",
                                      "--loss-log-file", str(log)]),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
            time.sleep(0.05)
        _, out = _run(tmp_path, "second", ["--train-iters", "4", "--save", str(ckpt)], nproc=1, expect_rc=1)
        assert f"another run is saving into --save {ckpt} (host " in out and f"pid {first.pid}" in out
        assert out.count("another run is saving") == 1 and "Traceback" not in out
    finally:
        first.kill()
        first.wait(timeout=60)
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    rows, _ = _run(tmp_path, "third", ["--train-iters", str(saved + 1), "--save", str(ckpt), "--load", str(ckpt)],
                   nproc=1)
    assert [r["iteration"] for r in rows] == [saved + 1]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, "keep", ["--train-iters", "4", "--save", str(ckpt), "--save-interval", "1", "--keep-last", "2"],
         nproc=1)
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("iter_")) == ["iter_0000003", "iter_0000004"]


@pytest.mark.fault
def test_checkpoint_from_fpdt2_continues_identically_under_tp2(tmp_path):
    """Saved with FPDT 2; resumed with FPDT 2 and with TP 2 x FPDT 1: the same losses afterwards,
    so model and optimizer state both reshard (dropout off: RNG streams differ across layouts).
    The vocabulary (300) pads to 384 rows at TP 1 and to 512 at TP 2: the TP 2 run keeps the
    checkpoint's 384 rows (megatron-core alone would add 128 zero rows to the softmax)."""
    ckpt = tmp_path / "ckpt"
    no_dropout = ["--hidden-dropout", "0", "--eval-iters", "1", "--eval-interval", "4", "--vocab-size", "300"]
    _run(tmp_path, "save", [*FPDT, *no_dropout, "--train-iters", "4", "--exit-interval", "2", "--save", str(ckpt)])
    same, _ = _run(tmp_path, "fpdt2", [*FPDT, *no_dropout, "--train-iters", "4", "--load", str(ckpt)])
    tp2, out = _run(tmp_path, "tp2", [*no_dropout, "--tensor-model-parallel-size", "2", "--train-iters", "4",
                                      "--load", str(ckpt)])
    assert "RNG streams re-seeded" in out
    assert [r["iteration"] for r in same] == [r["iteration"] for r in tp2] == [3, 4]
    for a, b in zip(same, tp2):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5), (a, b)
    assert tp2[-1]["val_loss"] == pytest.approx(same[-1]["val_loss"], rel=1e-5)


@pytest.mark.fault
def test_a_checkpoint_of_another_model_or_vocabulary_is_refused_naming_what_differs(tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, "save", ["--train-iters", "3", "--exit-interval", "1", "--save", str(ckpt)], nproc=1)
    for flags, says in ((["--vocab-size", "257"], "a vocabulary of 256 tokens (this run's tokenizer: 257)"),
                        (["--hidden-size", "32"], "--hidden-size 64 (this run: 32)"),
                        (["--num-query-groups", "4"], "--num-query-groups 2 (this run: 4)")):
        _, out = _run(tmp_path, "other", ["--train-iters", "3", "--load", str(ckpt), *flags], nproc=1, expect_rc=2)
        assert f"{ckpt}/iter_0000001 holds another model" in out and says in out, out
        assert "Traceback" not in out


def test_exit_duration_saves_and_stops(tmp_path):
    ckpt = tmp_path / "ckpt"
    rows, out = _run(tmp_path, "duration", ["--train-iters", "1000", "--save", str(ckpt),
                                            "--exit-duration-in-mins", "0.0001"], nproc=1)
    assert [r["iteration"] for r in rows] == [1]
    assert "--exit-duration-in-mins 0.0001 reached" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"
