"""The training driver: argument validation, and end-to-end loss parity FPDT vs baseline.

The parity run is pretrain_llama.py for 10 iterations: 2 processes with
``--fpdt --fpdt-parallel-size 2 --fpdt-offload`` (and full recompute with the
checkpointed inputs offloaded) against 1 process without ``--fpdt``; same seed,
same mock data. Logged losses must agree to float32 precision.
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from megatron.training.flops import training_flops_per_token
from tests.disk_dir import shared_disk_scratch_dir
from tests.helpers import TINY, run_pretrain, run_script

# one sequence per micro batch, the global batch one micro batch per data-parallel rank
ONE = TINY + ["--train-iters", "10", "--micro-batch-size", "1", "--global-batch-size", "2"]


def _validate(extra, world_size=2):
    return validate_args(parse_args(ONE + extra), world_size=world_size)


@pytest.mark.parametrize("extra,world_size,message", [
    (["--fpdt", "--fpdt-parallel-size", "3"], 3, "num_attention_heads 4 is not divisible by"),
    (["--fpdt", "--fpdt-parallel-size", "2", "--attention-dropout", "0.1"], 2, "--attention-dropout 0"),
    (["--fpdt", "--fpdt-parallel-size", "2", "--attention-dropout", "0", "--fpdt-chunk-size", "48"], 2,
     "not divisible by fpdt_chunk_size 48"),
    (["--fpdt", "--fpdt-parallel-size", "4", "--attention-dropout", "0", "--fpdt-chunk-size", "6"], 4,
     "use a multiple of 4"),
    (["--fpdt-parallel-size", "2"], 2, "needs --fpdt"),
    (["--fpdt", "--fpdt-parallel-size", "2", "--attention-dropout", "0"], 3, "world size 3 is not divisible"),
    (["--tensor-model-parallel-size", "2", "--fpdt", "--fpdt-parallel-size", "2", "--attention-dropout", "0",
      "--group-query-attention", "--num-query-groups", "1"], 4, "num_query_groups 1 is not divisible"),
    (["--context-parallel-size", "2"], 2, "use --fpdt --fpdt-parallel-size"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 2 does not split over 3 pipeline stages"),
    (["--global-batch-size", "3"], 2, "use a multiple of 2"),
    (["--fpdt", "--fpdt-parallel-size", "2", "--attention-dropout", "0", "--tensor-model-parallel-size", "2",
      "--sequence-parallel"], 4, "--sequence-parallel"),
    (["--offload-recompute-inputs"], 1, "needs --recompute-granularity full"),
    (["--bf16", "--fp16"], 1, "choose one"),
    (["--offload-dir", "."], 1, "--offload-dir has nothing to hold"),
    (["--load", "/no/such/run"], 1, "--load /no/such/run does not exist"),
    (["--global-batch-size", "0"], 1, "--global-batch-size must be positive"),
    (["--seq-length", "-8"], 1, "--seq-length must be positive"),
    (["--make-vocab-size-divisible-by", "0"], 1, "--make-vocab-size-divisible-by must be positive"),
    (["--hidden-dropout", "1.5"], 1, "--hidden-dropout 1.5 is out of range: it must be in [0, 1)"),
    (["--adam-beta2", "1"], 1, "--adam-beta2 1 is out of range"),
    (["--clip-grad", "-1"], 1, "--clip-grad -1 is out of range: it must be >= 0"),
    (["--lr-warmup-iters", "-1"], 1, "--lr-warmup-iters -1 is out of range"),
    (["--split", "0,0,0"], 1, "--split 0,0,0: give up to three non-negative weights"),
    (["--split", "a,b"], 1, "--split a,b"),
    (["--dry-run", "--dry-run-world-size", "-2"], 1, "--dry-run-world-size must be positive"),
    (["--exit-duration-in-mins", "-1"], 1, "--exit-duration-in-mins -1 is out of range"),
    (["--recompute-granularity", "full", "--offload-recompute-inputs", "--offload-dir", "/no/such/dir"], 1,
     "does not exist"),
])
@pytest.mark.fault
def test_bad_configurations_are_rejected_with_what_to_change(extra, world_size, message):
    with pytest.raises(ArgumentError, match=re.escape(message)):
        _validate(extra, world_size)


@pytest.mark.fault
def test_a_save_location_that_cannot_hold_checkpoints_is_refused_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ArgumentError, match="--save .*/file: .*/file is a file, not a directory"):
        _validate(["--save", str(tmp_path / "file")], world_size=1)
    with pytest.raises(ArgumentError, match="--save .*/file/run: .*/file is a file, not a directory"):
        _validate(["--save", str(tmp_path / "file" / "run")], world_size=1)
    with pytest.raises(ArgumentError, match="--loss-log-file .*/file/log.jsonl: .*/file is a file"):
        _validate(["--loss-log-file", str(tmp_path / "file" / "log.jsonl")], world_size=1)


@pytest.mark.fault
def test_a_load_directory_without_checkpoints_is_refused_rather_than_training_from_scratch(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgumentError, match="holds no checkpoint .* would train from scratch"):
        _validate(["--load", str(tmp_path / "empty")], world_size=1)
    (tmp_path / "run" / "iter_0000002").mkdir(parents=True)
    (tmp_path / "run" / "iter_0000002" / "manifest.json").write_text("{}")
    with pytest.raises(ArgumentError, match=f"is one checkpoint; give the directory that holds it \\({tmp_path}/run"):
        _validate(["--load", str(tmp_path / "run" / "iter_0000002")], world_size=1)
    assert _validate(["--load", str(tmp_path / "run")], world_size=1).checkpoint.load == str(tmp_path / "run")


def test_load_may_name_the_save_directory_before_it_exists(tmp_path):
    """--load DIR --save DIR: resume if there is something to resume (the first start has nothing)."""
    run = str(tmp_path / "run")
    assert _validate(["--load", run, "--save", run], world_size=1).checkpoint.load == run


def test_deepspeed_fpdt_flags_are_aliases():
    args = _validate(["--ds-sequence-parallel-fpdt", "--ds-sequence-parallel-size", "2",
                      "--ds-sequence-parallel-fpdt-chunk-size", "16", "--ds-sequence-parallel-fpdt-offloading",
                      "--attention-dropout", "0"])
    fpdt = args.fpdt
    assert (fpdt.fpdt_parallel_size, fpdt.fpdt_chunk_size, fpdt.fpdt_offload) == (2, 16, True)
    assert args.fpdt_num_chunks == 128 // 16 and args.parallel.data_parallel_size == 1  # TINY: 128 tokens


def test_flops_formula():
    # L=1, h=4, H=KV=2 heads of d=2, f=8, V=10, S=6, GeLU:
    # qkv 2*4*6*2=96, attention 2*2*2*6=48, projection 2*2*2*4=32, mlp 2*4*8*2=128, logits 2*4*10=80
    flops = training_flops_per_token(num_layers=1, hidden_size=4, num_heads=2, num_kv_heads=2, head_dim=2,
                                     ffn_hidden_size=8, vocab_size=10, seq_length=6, gated=False)
    assert flops == 3 * (96 + 48 + 32 + 128 + 80)


@pytest.mark.fault
def test_entry_point_reports_bad_flags_and_exits_2():
    proc = run_script(1, "pretrain_gpt.py", [*ONE, "--fpdt-parallel-size", "2"], timeout=300, expect_rc=2)
    assert "--fpdt-parallel-size 2 needs --fpdt" in proc.stderr


LLAMA = TINY + ["--train-iters", "10", "--lr", "3e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
                "--min-lr", "3e-4", "--clip-grad", "1.0", "--weight-decay", "0.1", "--seed", "42",
                "--recompute-granularity", "full"]


def _run(tmp_path, name, nproc, extra):
    return run_pretrain(tmp_path, name, nproc, LLAMA + extra)[0]


def test_fpdt_training_matches_baseline_losses(tmp_path):
    baseline = _run(tmp_path, "baseline", 1, [])
    fpdt = _run(tmp_path, "fpdt", 2, ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32",
                                      "--fpdt-offload", "--offload-recompute-inputs"])
    assert [r["iteration"] for r in baseline] == list(range(1, 11))
    assert [r["iteration"] for r in fpdt] == list(range(1, 11))
    for b, f in zip(baseline, fpdt):
        assert f["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-5), (b, f)
        assert f["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (b, f)
    assert baseline[-1]["lm_loss"] < baseline[0]["lm_loss"], "the loss should fall over 10 iterations"


def test_offload_to_disk_trains_exactly_as_offload_to_host(tmp_path):
    """--offload-dir: the attention chunks and the checkpointed layer inputs (128 KiB per layer
    and rank here, over the 64 KiB threshold) go to a file; the arithmetic is unchanged."""
    flags = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "128", "--fpdt-offload",
             "--offload-recompute-inputs", "--seq-length", "512", "--train-iters", "3"]
    host = _run(tmp_path, "host", 2, flags)
    disk = _run(tmp_path, "disk", 2, flags + ["--offload-dir", shared_disk_scratch_dir()])
    assert [(r["lm_loss"], r["grad_norm"]) for r in disk] == [(r["lm_loss"], r["grad_norm"]) for r in host]
    # rank 0 at its peak: 2 layer inputs of 256 tokens x 2 sequences x 64 x 4 bytes, plus chunks
    assert all(r["peak_disk_gib"] * 2**30 >= 2 * 256 * 2 * 64 * 4 for r in disk), disk
    assert all("peak_disk_gib" not in r for r in host)


def test_data_parallel_x_fpdt_matches_baseline_losses(tmp_path):
    """4 processes = DP 2 x FPDT 2: gradients reduced over data x FPDT ranks give the baseline's losses."""
    baseline = _run(tmp_path, "baseline", 1, ["--train-iters", "4"])
    fpdt = _run(tmp_path, "dp2_fpdt2", 4, ["--train-iters", "4", "--fpdt", "--fpdt-parallel-size", "2",
                                           "--fpdt-chunk-size", "64"])
    for b, f in zip(baseline, fpdt):
        assert f["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-5), (b, f)


def _qk_layernorm_grads_worker(rank, world_size, flags):
    from megatron.training.training import Trainer

    trainer = Trainer(validate_args(parse_args(flags), world_size=world_size))
    trainer.train_step()
    grads = {n: p.main_grad.clone() for n, p in trainer.model.named_parameters() if "layernorm" in n}
    return {"tp_rank": trainer.groups.pg_collection.tp.rank(), "grads": grads}


def test_qk_layernorm_gradients_are_summed_over_tensor_parallel_ranks():
    """TP 2 x FPDT 2 with q/k layernorm (megatron-core's own attention forward): those weights see
    only this TP rank's heads, so after a step their gradients must be the sum over TP, equal on
    every rank (megatron-core's finalize_model_grads; a bare DDP sync leaves them partial)."""
    from fpdt_ext.testing.spawn import run_world

    flags = LLAMA + ["--attention-dropout", "0", "--hidden-dropout", "0", "--qk-layernorm",
                     "--tensor-model-parallel-size", "2", "--fpdt", "--fpdt-parallel-size",
                     "2", "--fpdt-chunk-size", "64"]
    results = run_world(4, _qk_layernorm_grads_worker, flags)
    by_tp = {r["tp_rank"]: r["grads"] for r in results}
    names = [n for n in by_tp[0] if "q_layernorm" in n or "k_layernorm" in n]
    assert names, "no q/k layernorm parameters"
    for name in names:
        assert by_tp[0][name].abs().sum() > 0, name
        torch.testing.assert_close(by_tp[0][name], by_tp[1][name], rtol=1e-6, atol=0, msg=name)


def test_bf16_fpdt_training_runs_and_learns(tmp_path):
    bf16 = _run(tmp_path, "bf16", 2, ["--bf16", "--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32"])
    fp32 = _run(tmp_path, "fp32", 1, [])
    assert all(r["lm_loss"] == r["lm_loss"] for r in bf16), "NaN loss"
    assert bf16[-1]["lm_loss"] < bf16[0]["lm_loss"]
    for b, f in zip(bf16, fp32):
        assert b["lm_loss"] == pytest.approx(f["lm_loss"], rel=3e-2), (b, f)


@pytest.mark.parametrize("fpdt", [False, True], ids=["baseline", "fpdt"])
def test_bf16_gpt_with_layernorm_trains(tmp_path, fpdt):
    """GPT's LayerNorm in bf16: megatron-core makes torch norms in float32, whose output would meet
    the bf16 QKV weights; the model is cast to the training dtype, as Megatron's Float16Module does."""
    extra = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32"] if fpdt else []
    rows, _ = run_pretrain(tmp_path, "gpt", 2 if fpdt else 1,
                           [*ONE, "--train-iters", "4", "--bf16", "--attention-dropout", "0", "--hidden-dropout", "0",
                            "--lr", "3e-3", *extra], script="pretrain_gpt.py", timeout=600)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and rows[-1]["lm_loss"] < rows[0]["lm_loss"]


def _optimizer_run_worker(rank, world_size, flags, steps):
    from megatron.training.training import Trainer

    trainer = Trainer(validate_args(parse_args(flags), world_size=world_size))
    history = [trainer.train_step() for _ in range(steps)]
    opt = trainer.optimizer
    owned = {name for name, p in trainer.model.module.named_parameters()
             if any(p is param for _, param in opt._pairs)}
    state_numel = sum(t.numel() for entry in opt.optimizer.state.values() for t in entry.values() if t.ndim)
    return {"history": history, "owned": owned, "state_numel": state_numel,
            "params": {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()},
            "total_numel": sum(p.numel() for p in trainer.model.module.parameters())}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_optimizer_splits_adam_state_and_matches_the_unsharded_run(dtype):
    """--use-distributed-optimizer on the CPU (FPDT 2): each rank keeps Adam state (and bf16's fp32
    master weights) only for the parameters it owns, the owners cover every parameter once, and
    losses, gradient norms and weights are bit for bit those of the unsharded optimizer."""
    from fpdt_ext.testing.spawn import run_world

    flags = LLAMA + ["--attention-dropout", "0", "--hidden-dropout", "0", "--fpdt", "--fpdt-parallel-size", "2",
                     "--fpdt-chunk-size", "32"] + (["--bf16"] if dtype == "bf16" else [])
    full = run_world(2, _optimizer_run_worker, flags, 3)
    sharded = run_world(2, _optimizer_run_worker, flags + ["--use-distributed-optimizer"], 3)
    total = full[0]["total_numel"]
    assert [r["state_numel"] for r in full] == [2 * total] * 2  # exp_avg + exp_avg_sq of everything
    assert full[0]["owned"] == sharded[0]["owned"] | sharded[1]["owned"]
    assert not sharded[0]["owned"] & sharded[1]["owned"]
    assert sum(r["state_numel"] for r in sharded) == 2 * total
    assert all(r["state_numel"] < 0.6 * 2 * total for r in sharded), [r["state_numel"] for r in sharded]
    for a, b in zip(full, sharded):
        assert a["history"] == b["history"]  # (loss, grad norm) per step, exactly
        for name, value in a["params"].items():
            assert torch.equal(value, b["params"][name]), name
    assert full[0]["history"][-1][0] < full[0]["history"][0][0]


@pytest.mark.fault
@pytest.mark.parametrize("check", [True, False], ids=["stops", "skips"])
def test_a_nan_stops_the_run_naming_the_iteration_and_saves_nothing_diverged(tmp_path, check):
    """An LR of 1e30 makes iteration 2 non-finite. With the check (the default, as Megatron-LM) the
    run stops there with one line naming it, exit 1, and no checkpoint of that step; without it,
    the step is skipped and counted."""
    save = tmp_path / "ckpt"
    flags = [*ONE, "--train-iters", "4", "--lr", "1e30", "--save", str(save), "--save-interval", "1"]
    rows, out = run_pretrain(tmp_path, "nan", 1, flags + ([] if check else ["--no-check-for-nan-in-loss-and-grad"]),
                             expect_rc=1 if check else 0)
    if check:
        assert "at iteration 2 is nan: stopping" in out and "Traceback" not in out
        assert [r["iteration"] for r in rows] == [1]
        assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"
        assert not (save / "iter_0000002").exists()
    else:
        assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
        assert "number of skipped iterations:   1" in out or "number of nan iterations:   1" in out
