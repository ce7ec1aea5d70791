"""Pipeline parallelism end to end (pretrain_llama.py under torchrun): training parity with the
single-stage run over 10 iterations, exact resume, checkpoints across pipeline sizes, the
refusals. The runs start from one checkpoint, because Megatron seeds each stage apart (a PP 2
run's fresh weights are not a PP 1 run's)."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, assert_no_worker_traceback, run_pretrain

KEY = ("lm_loss", "grad_norm", "lr")
FLAGS = [*TINY, "--num-layers", "4", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "11",
         "--lr", "1e-3", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--attention-dropout", "0",
         "--hidden-dropout", "0", "--seed", "3"]
PP2 = ["--pipeline-model-parallel-size", "2"]
FPDT2 = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--fpdt-offload"]


def rows(tmp_path, name, nproc, *extra):
    """[loss, gradient norm, LR] per iteration, and the validation loss where there is one."""
    return [[r[k] for k in KEY] + ([r["val_loss"]] if "val_loss" in r else [])
            for r in run_pretrain(tmp_path, name, nproc, [*FLAGS, *extra])[0]]


def close(a, b, rel=1e-5):
    for x, y in zip(a, b):
        assert len(x) == len(y) and x == pytest.approx(y, rel=rel)
    assert len(a) == len(b)


def test_pipelined_training_follows_the_single_stage_run_and_checkpoints_cross_pipeline_sizes(tmp_path):
    start = str(tmp_path / "start")  # iteration 1 at PP 1: the weights every run below continues from
    rows(tmp_path, "start", 1, "--save", start, "--exit-interval", "1")
    validation = ("--eval-iters", "2", "--eval-interval", "5")  # evaluation through the schedule too
    single = rows(tmp_path, "single", 1, "--load", start, *validation)
    piped = rows(tmp_path, "piped", 2, *PP2, "--load", start, *validation)  # a PP 1 checkpoint loads at PP 2
    assert len(single) == 10 and [len(r) for r in single].count(4) == 3  # validation at 5, 10 and 11
    close(piped, single)  # 10 iterations: loss, gradient norm, LR, and the validation losses
    single, piped = ([r[:3] for r in x] for x in (single, piped))
    saved = str(tmp_path / "pp2")  # a PP 2 run stopped at iteration 6 ...
    first = rows(tmp_path, "first", 2, *PP2, "--load", start, "--save", saved, "--exit-interval", "6")
    assert first == piped[:5]
    assert rows(tmp_path, "resumed", 2, *PP2, "--load", saved) == piped[5:]  # ... resumes exactly
    close(rows(tmp_path, "into_pp1", 1, "--load", saved), single[5:])  # and loads at PP 1 ...
    # ... and into the HF converter: the exported model's logits are the checkpoint's, read whole
    import torch
    import transformers

    from fpdt_ext.testing.spawn import run_world
    from tests.e2e.test_convert import _convert, our_logits_worker

    _convert("llama", "mcore", "hf", saved, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    ours = run_world(1, our_logits_worker, str(saved), tokens, 6)[0]
    with torch.no_grad():
        assert (hf(tokens).logits[..., :ours.shape[-1]] - ours).abs().max().item() < 1e-4  # (its first 200)


@pytest.mark.slow
def test_a_pipelined_checkpoint_loads_at_pp2_x_fpdt2_and_interleaved(tmp_path):
    start = str(tmp_path / "start")
    rows(tmp_path, "start", 2, *PP2, "--save", start, "--exit-interval", "2")
    straight = rows(tmp_path, "pp2", 2, *PP2, "--load", start)
    close(rows(tmp_path, "pp2_fpdt2", 4, *PP2, *FPDT2, "--load", start), straight)
    close(rows(tmp_path, "interleaved", 2, *PP2, "--num-virtual-stages-per-pipeline-rank", "2", "--load", start),
          straight)


@pytest.mark.slow
def test_a_sharded_pipelined_run_resumes_exactly_and_its_checkpoint_loads_unsharded_at_pp1(tmp_path):
    """PP 2 x FPDT 2 with FSDP2 (each stage's parameters sharded over its FPDT ranks, the tied
    embedding's copies summed as shards): a run stopped at iteration 3 resumes bit for bit, and its
    checkpoint continues at PP 1 unsharded with the same losses."""
    start = str(tmp_path / "start")
    rows(tmp_path, "start", 1, "--save", start, "--exit-interval", "1")
    sharded = [*PP2, *FPDT2, "--use-torch-fsdp2", "--train-iters", "5"]
    straight = rows(tmp_path, "straight", 4, *sharded, "--load", start)
    saved = str(tmp_path / "saved")
    assert rows(tmp_path, "first", 4, *sharded, "--load", start, "--save", saved, "--exit-interval", "3") \
        == straight[:2]
    assert rows(tmp_path, "resumed", 4, *sharded, "--load", saved) == straight[2:]
    close(rows(tmp_path, "pp1", 1, "--train-iters", "5", "--load", saved), straight[2:])


def test_a_bad_pipeline_layout_is_refused_in_one_line_before_anything_is_built(tmp_path):
    """(The other refusals: tests/unit/test_pipeline_config.py.)"""
    _, out = run_pretrain(tmp_path, "bad", 3, [*FLAGS, "--pipeline-model-parallel-size", "3"], expect_rc=1)
    assert "--num-layers 4 does not split over 3 pipeline stages" in out, out[-2000:]
    assert_no_worker_traceback(out)
