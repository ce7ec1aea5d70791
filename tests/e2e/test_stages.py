"""Training in stages: --finetune (a new stage from a checkpoint's weights), its restart, and
--no-load-optim / --no-load-rng (docs/STAGES.md).

Stage 1 is the tiny Llama at 128 tokens, FPDT 2 with 32-token chunks, hidden dropout on (so RNG
streams matter), saved at iteration 3. Stage 2 runs at 256 tokens with 64-token chunks.
"""

from __future__ import annotations

import re
import shutil

import pytest

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.helpers import TINY, assert_no_worker_traceback, run_pretrain

MODEL = TINY + ["--lr", "3e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--min-lr", "3e-4",
                "--lr-decay-iters", "10", "--hidden-dropout", "0.1", "--seed", "11"]
STAGE1 = MODEL + ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--fpdt-offload"]
STAGE2 = MODEL + ["--seq-length", "256", "--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "64",
                  "--train-iters", "5", "--eval-iters", "1", "--eval-interval", "2"]
FRESH_WARMUP = [1.5e-3, 3e-3]  # --lr 3e-3 over 2 warmup iterations, from step 0


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    rows, _ = run_pretrain(tmp, "stage1", 2, [*STAGE1, "--train-iters", "3", "--save", str(tmp / "ckpt")])
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    return tmp / "ckpt"


def _fresh_model_with_loaded_weights(rank, world_size, flags, checkpoint, steps):
    """A fresh stage-2 run (no --load) whose model then takes the checkpoint's weights, by
    megatron-core's loader directly: what --finetune must amount to."""
    from megatron.core import dist_checkpointing

    from megatron.training.training import Trainer
    from pretrain_llama import LLAMA_DEFAULTS

    trainer = Trainer(validate_args(parse_args(flags, defaults=LLAMA_DEFAULTS), world_size=world_size))
    model = trainer.model.module
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, checkpoint)["model"])
    trainer.optimizer.reload_model_params()
    history = []
    for iteration in range(1, steps + 1):
        loss, grad_norm, _ = trainer.train_step()
        val_loss = trainer.evaluate() if iteration % 2 == 0 or iteration == steps else None
        history.append((loss, grad_norm, trainer.optimizer.param_groups[0]["lr"], val_loss))
    return history


def test_finetune_starts_a_new_stage_at_iteration_0_and_a_restart_resumes_it(tmp_path, stage1):
    """Stage 2 with --finetune at a longer sequence and another chunk size: iterations from 1, a
    fresh LR warmup, training and validation data from sample 0, and losses, gradient norms,
    learning rates and validation losses bit for bit those of a fresh run whose model took the
    checkpoint's weights. Interrupted, the same command
    run again resumes from the stage's own --save (not from stage 1 again), and a plain resume
    (--load pointing at the stage's --save) continues it exactly."""
    from fpdt_ext.testing.spawn import run_world

    save = tmp_path / "stage2"
    command = [*STAGE2, "--finetune", "--load", str(stage1), "--save", str(save), "--exit-interval", "2"]
    first, out = run_pretrain(tmp_path, "first", 2, command)
    assert f"finetuning from {stage1}/iter_0000003 (iteration 3)" in out
    assert "consumed samples:            4 |" in out  # the data from sample 0
    requeued, out = run_pretrain(tmp_path, "requeued", 2, command)
    assert f"--save {save} holds this stage's checkpoints: resuming from them" in out and "finetuning" not in out
    resumed, _ = run_pretrain(tmp_path, "resumed", 2, [*STAGE2, "--load", str(save), "--save", str(save)])
    rows = first + requeued + resumed
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in rows[:2]] == FRESH_WARMUP

    reference = run_world(2, _fresh_model_with_loaded_weights, STAGE2, str(stage1 / "iter_0000003"), 5)[0]
    assert [r["iteration"] for r in rows if "val_loss" in r] == [2, 4, 5]
    for row, expected in zip(rows, reference):
        assert (row["lm_loss"], row["grad_norm"], row["lr"], row.get("val_loss")) == expected, (row, reference)


def test_no_load_optim_and_no_load_rng_leave_out_what_they_name(tmp_path, stage1):
    """From stage 1's checkpoint at the same layout: a full resume; --no-load-optim (the same first
    loss: weights, data position and RNG are loaded; the LR warmup starts again, and the fresh Adam
    state takes the second step elsewhere); --no-load-rng (the schedule continues; other dropout
    masks, so another first loss)."""
    flags = [*STAGE1, "--train-iters", "5", "--load", str(stage1)]
    full, _ = run_pretrain(tmp_path, "full", 2, flags)
    no_optim, out = run_pretrain(tmp_path, "no_optim", 2, [*flags, "--no-load-optim"])
    assert "--no-load-optim: the optimizer state and the LR schedule start afresh" in out
    assert re.search(r"iteration +4/ +5 \| consumed samples: +16 \|", out)  # the data continue
    no_rng, out = run_pretrain(tmp_path, "no_rng", 2, [*flags, "--train-iters", "4", "--no-load-rng"])
    assert "--no-load-rng; RNG streams re-seeded from --seed and the iteration" in out
    assert [r["iteration"] for r in full] == [r["iteration"] for r in no_optim] == [4, 5]
    assert [r["iteration"] for r in no_rng] == [4]

    assert [r["lr"] for r in no_optim] == FRESH_WARMUP and [r["lr"] for r in full] != FRESH_WARMUP
    assert no_optim[0]["lm_loss"] == full[0]["lm_loss"] and no_optim[1]["lm_loss"] != full[1]["lm_loss"]
    assert no_rng[0]["lr"] == full[0]["lr"] and no_rng[0]["lm_loss"] != full[0]["lm_loss"]


@pytest.mark.fault
def test_finetune_into_a_directory_of_another_run_is_refused(tmp_path, stage1):
    """A stage's iterations restart at 0: saved among another run's checkpoints, a resume would
    take the other run's newer ones. Refused before anything is built, one line, exit 1."""
    other = tmp_path / "other"
    shutil.copytree(stage1, other)  # checkpoints of a run that was not finetuned from --load
    _, out = run_pretrain(tmp_path, "refused", 1, [*MODEL, "--train-iters", "2", "--finetune", "--load",
                                                   str(stage1), "--save", str(other)], expect_rc=1)
    assert (f"--save {other} already holds {other}/iter_0000003, which is not from a run finetuned from --load "
            f"{stage1}: give this stage an empty --save directory") in out
    assert_no_worker_traceback(out)


@pytest.mark.parametrize("extra,message", [
    (["--finetune"], "--finetune needs --load DIR"),
    (["--no-load-optim"], "--no-load-optim needs --load DIR"),
    (["--no-load-rng"], "--no-load-rng needs --load DIR"),
    (["--finetune", "--load", "{run}", "--save", "{run}"], "give the new stage its own --save directory"),
])
def test_stage_flags_without_what_they_need_are_refused(tmp_path, extra, message):
    (tmp_path / "run" / "iter_0000001").mkdir(parents=True)
    extra = [e.format(run=tmp_path / "run") for e in extra]
    with pytest.raises(ArgumentError, match=re.escape(message)):
        validate_args(parse_args([*MODEL, "--train-iters", "2", *extra]), world_size=1)


@pytest.mark.fault
def test_learned_positions_cannot_grow_in_a_new_stage(tmp_path):
    """GPT's learned absolute positions have one row per position: a stage at a longer sequence
    (more rows) is refused before anything is built, naming the flag (exit 2)."""
    gpt = TINY + ["--attention-dropout", "0", "--hidden-dropout", "0"]
    run_pretrain(tmp_path, "gpt", 1, [*gpt, "--train-iters", "1", "--save", str(tmp_path / "gpt")],
                 script="pretrain_gpt.py")
    _, out = run_pretrain(tmp_path, "longer", 1, [*gpt, "--seq-length", "256", "--train-iters", "1", "--finetune",
                                                  "--load", str(tmp_path / "gpt"), "--save", str(tmp_path / "s2")],
                          script="pretrain_gpt.py", expect_rc=2)
    assert "--max-position-embeddings 128 (this run: 256)" in out
    assert_no_worker_traceback(out)
