"""--use-torch-fsdp2 (megatron/training/sharding.py): parameters, gradients and optimizer state
sharded over data x FPDT ranks, against the unsharded run (megatron-core's DDP), fp32 on gloo.

Per iteration, the loss and every parameter's full gradient (gathered from the shards) equal
the unsharded run's; after the iterations, every parameter does. Each rank holds 1/N of the
parameters, gradients and Adam state. The decoupled LR groups (megatron-core's marks on the
parameters) survive the sharding, so the embedding and output layer train at their own rate.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fpdt_ext.testing.spawn import run_world
from tests.helpers import TINY

STEPS = 3
FLAGS = TINY + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(STEPS), "--lr", "1e-3",
                "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "11", "--untie-embeddings-and-output-weights",
                "--decoupled-lr", "3e-3", "--decoupled-min-lr", "2e-4", "--lr-decay-style", "cosine", "--min-lr", "1e-4"]
FPDT = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--fpdt-offload",
        "--recompute-granularity", "full", "--offload-recompute-inputs"]


def _full(tensor):
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().double().clone()


def worker(rank, world_size, flags):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.sharding import local
    from megatron.training.training import Trainer

    trainer = Trainer(validate_args(parse_args(flags), world_size=world_size))
    module = trainer.model.module
    sharded = "--use-torch-fsdp2" in flags
    grads, losses = [], []
    step = trainer.optimizer.step

    def recording_step():  # the reduced gradients, as the optimizer is about to use them
        grads.append({n: _full(p.grad if sharded else p.main_grad) for n, p in module.named_parameters()})
        return step()

    trainer.optimizer.step = recording_step
    for _ in range(STEPS):
        losses.append(trainer.train_step()[0])
    opt = trainer.optimizer.optimizer
    return {"losses": losses, "grads": grads,
            "params": {n: _full(p) for n, p in module.named_parameters()},
            "lrs": sorted({g["lr"] for g in opt.param_groups}),
            "marked": sorted(n for n, p in module.named_parameters()
                             if getattr(p, "is_embedding_or_output_parameter", False)),
            "held": {"params": sum(local(p).numel() for p in module.parameters()),
                     "adam": sum(local(v).numel() for s in opt.state.values() for k, v in s.items() if k != "step"),
                     "full": sum(p.numel() for p in module.parameters())}}


@functools.lru_cache(maxsize=None)
def run(world, flags):
    return run_world(world, worker, list(flags))


TP2 = ("--tensor-model-parallel-size", "2", "--qk-layernorm")  # q/k norms: gradients summed over TP


@pytest.mark.parametrize("layout, world, extra", [
    ("dp2", 2, ()),
    ("fpdt2", 2, tuple(FPDT)),
    ("tp2_fpdt2", 4, TP2 + tuple(FPDT)),
    pytest.param("fpdt2_dp2", 4, tuple(FPDT), marks=pytest.mark.slow),
    pytest.param("tp2_dp2", 4, TP2, marks=pytest.mark.slow),
])
def test_sharded_training_equals_the_unsharded_run(layout, world, extra):
    plain = run(world, tuple(FLAGS) + extra)
    sharded = run(world, tuple(FLAGS) + extra + ("--use-torch-fsdp2",))
    ref, got = plain[0], sharded[0]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    for step, (want, have) in enumerate(zip(ref["grads"], got["grads"])):
        assert want.keys() == have.keys()
        scale = max(g.abs().max().item() for g in want.values())
        for name in want:
            assert (have[name] - want[name]).abs().max().item() <= 1e-5 * scale, (step, name)
    for name, want in ref["params"].items():  # Adam's updates from those gradients
        assert (got["params"][name] - want).abs().max().item() <= 1e-5, name
    # the decoupled LR's groups: the same marked parameters, the same LRs
    assert got["marked"] == ref["marked"] and len(ref["marked"]) == 2
    assert got["lrs"] == pytest.approx(ref["lrs"]) and len(ref["lrs"]) == 2
    # every rank holds 1/N of its TP shards' parameters and Adam state (N = data x FPDT ranks)
    shards = world // (2 if "--tensor-model-parallel-size" in extra else 1)
    for r in sharded:
        held = r["held"]
        assert held["params"] == pytest.approx(held["full"] / shards, rel=0.01)
        assert held["adam"] == pytest.approx(2 * held["full"] / shards, rel=0.01)
    assert ref["held"]["params"] == ref["held"]["full"]


KEY = ("lm_loss", "grad_norm", "lr")
CHECKPOINT_FLAGS = [*FLAGS, *FPDT, "--train-iters", "4", "--bf16"]


def _rows(tmp_path, name, *extra, nproc=2):
    from tests.helpers import run_pretrain

    return [[r[k] for k in KEY] for r in run_pretrain(tmp_path, name, nproc, [*CHECKPOINT_FLAGS, *extra])[0]]


def test_sharded_checkpoints_resume_exactly_and_load_unsharded(tmp_path):
    """A sharded run saved at iteration 2 resumes with the uninterrupted run's losses, gradient
    norms and LRs, bit for bit; unsharded, it resumes to bf16's precision (the sharded run computes
    with bf16 casts of float32 shards, the unsharded one with bf16 weights and float32 masters).
    A wrong layout shows: megatron-core's SwiGLU factory under FSDP gave losses 0.6% off."""
    straight = _rows(tmp_path, "straight", "--use-torch-fsdp2")
    sharded = str(tmp_path / "sharded")
    assert _rows(tmp_path, "first", "--use-torch-fsdp2", "--save", sharded, "--exit-interval", "2") == straight[:2]
    assert _rows(tmp_path, "resumed", "--use-torch-fsdp2", "--load", sharded) == straight[2:]
    unsharded = _rows(tmp_path, "into_unsharded", "--load", sharded)
    assert [r[2] for r in unsharded] == [r[2] for r in straight[2:]]
    assert [r[0] for r in unsharded] == pytest.approx([r[0] for r in straight[2:]], rel=1e-3)


@pytest.mark.slow
def test_an_unsharded_checkpoint_resumes_sharded(tmp_path):
    plain = _rows(tmp_path, "plain")
    unsharded = str(tmp_path / "unsharded")
    _rows(tmp_path, "plain_first", "--save", unsharded, "--exit-interval", "2")
    resumed = _rows(tmp_path, "into_sharded", "--use-torch-fsdp2", "--load", unsharded)
    assert [r[0] for r in resumed] == pytest.approx([r[0] for r in plain[2:]], rel=1e-3)


@pytest.mark.slow
def test_a_tp2_sharded_checkpoint_resumes_exactly_and_loads_at_tp1_unsharded(tmp_path):
    """TP 2 x FPDT 2 with FSDP2 (SwiGLU: its fc1 rows laid out by swiglu_fragment) resumes bit for
    bit, and its checkpoint is the whole model: TP 1 x FPDT 2 unsharded continues it (bf16)."""
    tp = ["--tensor-model-parallel-size", "2", "--use-torch-fsdp2"]
    straight = _rows(tmp_path, "tp_straight", *tp, nproc=4)
    saved = str(tmp_path / "tp_sharded")
    assert _rows(tmp_path, "tp_first", *tp, "--save", saved, "--exit-interval", "2", nproc=4) == straight[:2]
    assert _rows(tmp_path, "tp_resumed", *tp, "--load", saved, nproc=4) == straight[2:]
    unsharded = _rows(tmp_path, "tp1_unsharded", "--load", saved)
    assert [r[0] for r in unsharded] == pytest.approx([r[0] for r in straight[2:]], rel=1e-3)


def test_swiglu_rows_of_a_tp_and_fsdp_shard_are_their_place_in_the_whole_weight():
    """The whole fc1 weight is [gate; up], gate and up each split over TP in order; FSDP rank r of
    N holds rows r/N .. (r+1)/N of its TP rank's [gate_t; up_t]."""
    from megatron.training.sharding import swiglu_fragment

    ffn, tp, n = 8, 2, 4
    whole = torch.arange(2 * ffn)  # row ids of [gate; up]
    gate, up = whole[:ffn].chunk(tp), whole[ffn:].chunk(tp)
    for t in range(tp):
        local = torch.cat([gate[t], up[t]]).chunk(n)
        for r in range(n):
            index, count = swiglu_fragment(r, n, t, tp)
            assert torch.equal(whole.chunk(count)[index], local[r]), (t, r)
    assert swiglu_fragment(3, 4) == (3, 4)  # TP 1: plain row shards


def test_sizes_fsdp_cannot_shard_evenly_are_refused_in_one_line(tmp_path):
    from tests.helpers import assert_no_worker_traceback, run_pretrain

    _, out = run_pretrain(tmp_path, "odd", 2, [*TINY, "--train-iters", "1", "--ffn-hidden-size", "129",
                                              "--use-torch-fsdp2"], script="pretrain_gpt.py",
                          expect_rc=1)  # torchrun's exit code for a failed worker (the worker's is 2)
    assert "needs every parameter's first dimension divisible by 2; not so: decoder.layers.0.mlp.linear_fc1.weight " \
           "(129, 64)" in out, out[-3000:]
    assert_no_worker_traceback(out)


def accumulation_worker(rank, world_size, flags):
    """After one micro batch's backward under the loop's ``no_sync`` (a micro batch before the
    last): which parameters hold their reduced shard of the gradient, and which hold an unsharded one."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.sharding import is_sharded
    from megatron.training.training import Trainer

    trainer = Trainer(validate_args(parse_args(flags), world_size=world_size))
    batch = next(iter(trainer.train_data.global_batch(trainer.config.training.global_batch_size)))
    with trainer.model.no_sync():
        local_sum, tokens = trainer._loss_terms(batch)
        (local_sum / tokens).backward()
    params = list(trainer.model.module.parameters())
    return {"reduced": sum(p.grad is not None and is_sharded(p.grad) and p.grad.dtype == torch.float32
                           for p in params), "all": len(params)}


def test_each_micro_batch_s_gradients_are_reduce_scattered_in_its_backward():
    """As megatron-core's FSDP2 wrapper: no unsharded gradient waits for the last micro batch
    (FSDP2's set_requires_gradient_sync(False) would keep every layer's, in float32, a whole copy of
    the model's gradients); every parameter holds its reduced float32 shard after each backward."""
    for r in run_world(2, accumulation_worker, [*FLAGS, *FPDT, "--use-torch-fsdp2", "--bf16"]):
        assert r["reduced"] == r["all"] > 0
