"""fpdt_ext.runtime on the CPU: megatron-core's CUDA assumptions redirected, memory readings.

The decisive check of the shims: with dropout on, megatron-core's full activation
recompute must replay the same dropout masks (its RNG save/restore goes through
the shims), so gradients with and without recompute are identical.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fpdt_ext.mcore.parallel_state import ParallelLayout
from fpdt_ext.testing.spawn import run_world
from fpdt_ext import runtime
from fpdt_ext.mcore.cpu_shims import CPURNGStatesTracker

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are inactive with CUDA")


def test_tracker_fork_uses_and_advances_its_own_stream():
    tracker = CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(3)
    with tracker.fork():
        second = torch.rand(3)
    assert torch.equal(torch.rand(3), outside), "fork must leave the default stream untouched"
    torch.manual_seed(123)
    assert torch.equal(first, torch.rand(3)) and torch.equal(second, torch.rand(3))
    with pytest.raises(Exception, match="already exists"):
        tracker.add("model-parallel-rng", 5)


def test_impossible_layouts_are_rejected():
    with pytest.raises(ValueError, match="world size 6 is not divisible .* = 4"):
        ParallelLayout(world_size=6, tensor_model_parallel_size=2, fpdt_parallel_size=2)
    assert ParallelLayout(world_size=8, tensor_model_parallel_size=2, fpdt_parallel_size=2).data_parallel_size == 2


def recompute_worker(rank, world_size):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.initialize import initialize, set_seed
    from megatron.training.models import build_model
    from megatron.core import tensor_parallel

    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--train-iters", "1", "--mock-data", "--vocab-size", "64", "--hidden-dropout", "0.3",
             "--attention-dropout", "0.3", "--seed", "5"]
    grads = {}
    for recompute in (False, True):
        args = validate_args(parse_args(flags + (["--recompute-granularity", "full"] if recompute else [])), 1)
        groups = initialize(args)
        model = build_model(args, groups, 64)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        set_seed(99, tp_rank=0)  # same dropout streams for both runs
        losses = model(tokens, torch.arange(16).expand(2, 16), None, labels=tokens)
        losses.sum().backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert tensor_parallel.get_cuda_rng_tracker().is_initialized()
    return {n: (grads[False][n] - grads[True][n]).abs().max().item() for n in grads[False]}


@functools.lru_cache(maxsize=None)
def recompute_report():
    return run_world(1, recompute_worker)[0]


def test_full_recompute_replays_dropout_on_cpu():
    diffs = recompute_report()
    assert max(diffs.values()) < 1e-6, diffs


def test_cpu_memory_readings_follow_an_allocation():
    rt = runtime.Runtime.detect()
    rt.reset_peak_memory()
    before = rt.memory_in_use_bytes()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert rt.memory_in_use_bytes() - before >= 60 << 20
    del block
    assert rt.peak_memory_bytes() - before >= 60 << 20
