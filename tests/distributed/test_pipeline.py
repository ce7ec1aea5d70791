"""Pipeline parallelism (megatron/training/pipeline.py): megatron-core's 1F1B and interleaved
schedules, for the baseline and FPDT, against the single-stage run, fp32 on gloo.

Both runs start from the same weights: every parameter is set from its global name (a layer's
index in the whole model, whatever stage holds it), because Megatron seeds each stage apart.
Per iteration the loss and gradient norm, and every parameter's reduced gradient, equal the
single-stage run's; after the iterations every parameter does (Adam's updates, clipping over
the stages included). The tied embedding's copy on the last stage gets the same gradient as the
first stage's, and the two stay equal. With --use-torch-fsdp2 each stage is sharded over its data
x FPDT ranks, and the single-stage run it is compared with is unsharded.
"""

from __future__ import annotations

import functools
import re
import zlib

import pytest
import torch

from fpdt_ext.testing.spawn import run_world
from tests.helpers import TINY

STEPS = 3
FLAGS = TINY + ["--num-layers", "4", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters",
                str(STEPS), "--lr", "1e-3", "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "5",
                "--clip-grad", "0.5"]
FPDT2 = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--fpdt-offload",
         "--recompute-granularity", "full", "--offload-recompute-inputs"]
FPDT1 = ["--fpdt", "--fpdt-chunk-size", "32", "--fpdt-offload"]  # one FPDT rank: chunked attention, offload


def global_names(module):
    """(global name, parameter) of a model chunk: decoder layers by their index in the whole model;
    the last stage's copy of a tied embedding under the embedding's name."""
    out = []
    for name, p in module.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            name = f"decoder.layers.{module.decoder.layers[int(m.group(1))].layer_number - 1}.{m.group(2)}"
        elif name == "output_layer.weight" and module.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"
        out.append((name, p))
    return out


def init_from_names(trainer):
    """Every parameter set from its global name, so every layout starts from the same model
    (FSDP2's sharded parameters: this rank's rows of it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for m in trainer.models:
            for name, p in global_names(m.module):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                value = torch.randn(p.shape, generator=g, dtype=torch.float64)
                value = (1 + 0.1 * value if p.ndim == 1 else 0.05 * value).to(p.dtype)
                if isinstance(p, DTensor):
                    value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                p.copy_(value)
    trainer.optimizer.reload_model_params()


def _full(tensor):
    """A whole tensor (FSDP2's DTensors gathered from their shards), as float64."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().double().clone()


def worker(rank, world_size, flags):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.training import Trainer

    trainer = Trainer(validate_args(parse_args(flags), world_size=world_size))
    init_from_names(trainer)
    grads, steps = [], []
    step = trainer.optimizer.step
    tp = f"@tp{trainer.groups.tp_rank}"  # a TP rank's shard of a parameter

    def recording_step():  # the reduced gradients, as the optimizer is about to use them
        seen = {}
        for m in trainer.models:
            for name, p in global_names(m.module):
                seen.setdefault(name + tp, []).append(_full(getattr(p, "main_grad", p.grad)))
        grads.append(seen)
        return step()

    trainer.optimizer.step = recording_step
    for _ in range(STEPS):
        loss, norm, _ = trainer.train_step()
        steps.append((loss, norm))
    params = {}
    for m in trainer.models:
        for name, p in global_names(m.module):
            params.setdefault(name + tp, []).append(_full(p))
    return {"steps": steps, "grads": grads, "params": params}


@functools.lru_cache(maxsize=None)
def run(world, flags):
    return run_world(world, worker, list(flags))


def merged(results, key):
    """The ranks' {global name: [tensors]} merged (a name held on several ranks: every copy)."""
    out = {}
    for r in results:
        for name, values in r[key].items():
            out.setdefault(name, []).extend(values)
    return out


def assert_matches(ref, got, tol=2e-6):
    """``got`` (a pipelined run's ranks) against ``ref`` (the single-stage run's): every rank's
    losses and norms; every gradient and parameter, each stage's and TP shard's against the same."""
    want_params = merged(ref, "params")
    want_grads = [merged([{"grads": r["grads"][step]} for r in ref], "grads") for step in range(STEPS)]
    for r in got:  # every rank reports the same loss and gradient norm
        for (loss, norm), (want_loss, want_norm) in zip(r["steps"], ref[0]["steps"]):
            assert loss == pytest.approx(want_loss, rel=tol) and norm == pytest.approx(want_norm, rel=tol)
    for step in range(STEPS):
        have = merged([{"grads": r["grads"][step]} for r in got], "grads")
        assert have.keys() == want_grads[step].keys()
        scale = max(g[0].abs().max().item() for g in want_grads[step].values())
        for name, copies in have.items():
            for g in copies:  # including the tied embedding's copy on the last stage
                assert (g - want_grads[step][name][0]).abs().max().item() <= tol * scale, (step, name)
    # after Adam: its steps are lr-sized (3 of 1e-3 here) whatever the gradient, so a gradient
    # near zero (some bias entries) carries float32 noise into the update; 5e-5 is 2% of them
    have = merged(got, "params")
    assert have.keys() == want_params.keys()
    for name, copies in have.items():
        for p in copies:
            assert (p - want_params[name][0]).abs().max().item() <= 5e-5, name


@pytest.mark.parametrize("layout, world, ref_world, extra, ref_extra", [
    ("pp2", 2, 1, ("--pipeline-model-parallel-size", "2"), ()),
    ("pp2_interleaved", 2, 1, ("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"),
     ()),
    ("pp2_uneven_fpdt_chunks", 2, 1, ("--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers",
                                      "1", "--untie-embeddings-and-output-weights", *FPDT1),
     ("--untie-embeddings-and-output-weights", *FPDT1)),
    pytest.param("pp2_fsdp2", 2, 1, ("--pipeline-model-parallel-size", "2", "--use-torch-fsdp2"), (),
                 marks=pytest.mark.slow),
    pytest.param("pp2_fpdt2", 4, 2, ("--pipeline-model-parallel-size", "2", *FPDT2), tuple(FPDT2),
                 marks=pytest.mark.slow),
    pytest.param("pp2_tp2", 4, 2, ("--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"),
                 ("--tensor-model-parallel-size", "2"), marks=pytest.mark.slow),
    ("pp2_fpdt2_fsdp2", 4, 2, ("--pipeline-model-parallel-size", "2", "--use-torch-fsdp2", *FPDT2), tuple(FPDT2)),
    pytest.param("pp2_dp2_interleaved_fsdp2", 4, 2, ("--pipeline-model-parallel-size", "2", "--use-torch-fsdp2",
                                                     "--num-virtual-stages-per-pipeline-rank", "2"), (),
                 marks=pytest.mark.slow),
    pytest.param("pp2_dp2_interleaved", 4, 2, ("--pipeline-model-parallel-size", "2",
                                               "--num-virtual-stages-per-pipeline-rank", "2"), (),
                 marks=pytest.mark.slow),
])
def test_pipelined_training_equals_the_single_stage_run(layout, world, ref_world, extra, ref_extra):
    ref = run(ref_world, tuple(FLAGS) + ref_extra)
    got = run(world, tuple(FLAGS) + extra)
    assert_matches(ref, got)


def held_inputs_worker(rank, world_size, flags):
    """The first stage's peak of checkpointed layer inputs in one step: offloaded to the disk tier,
    whose peak counts exactly what is held."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.training import Trainer

    trainer = Trainer(validate_args(parse_args(flags), world_size=world_size))
    trainer.train_step()
    return trainer.memory.peak_disk_bytes()


@pytest.mark.parametrize("schedule, extra, micro_batches", [
    ("1f1b", (), 1),
    ("1f1b", (), 4),
    ("interleaved", ("--num-virtual-stages-per-pipeline-rank", "2"), 4),
])
def test_the_first_stage_holds_the_checkpointed_inputs_the_planner_predicts(schedule, extra, micro_batches):
    """Under 1F1B the first stage holds its layers' inputs for min(PP, M) micro batches, the last
    for one; interleaved, megatron-core's warm-up holds more. tools/memory_planner.py's
    held_layer_inputs is checked against the measured peak (float32, 1024 tokens, h 64)."""
    from tests.disk_dir import disk_scratch_dir
    from tools.memory_planner import PRESETS, Model, Plan

    flags = [*TINY, "--num-layers", "4", "--seq-length", "1024", "--micro-batch-size", "1", "--global-batch-size",
             str(micro_batches), "--train-iters", "1", "--pipeline-model-parallel-size", "2",
             "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
             "--offload-recompute-inputs", "--offload-dir", disk_scratch_dir(), "--hidden-dropout", "0",
             "--attention-dropout", "0", *extra]  # (dropout would save its masks beside the inputs)
    first, last = run_world(2, held_inputs_worker, flags)
    plan = Plan(Model(4, *PRESETS["llama-tiny"][1:]), gpus=2, pp=2, vp=2 if extra else 1,
                microbatches=micro_batches, device="cpu")
    one_layer = 1024 * 64 * 4  # one layer's input: [s, b, h] float32
    assert first == plan.held_layer_inputs("first") * one_layer
    assert first == {(1, 1): 2, (1, 4): 4, (2, 4): 5}[(plan.vp, micro_batches)] * one_layer
    assert plan.held_layer_inputs("last") * one_layer <= last  # (the last stage saves its loss's tensors too)


def gpu_path_worker(rank, world_size, flags, cuda_path):
    """The trainer with its GPU branch (megatron-core's optimizer over the chunks, its DDP), tensors
    on the CPU (tests/cuda_on_cpu.py), or its CPU branch; the same weights either way."""
    from fpdt_ext import runtime
    from megatron.training.arguments import parse_args, validate_args
    from tests.cuda_on_cpu import cuda_path_on_cpu

    args = validate_args(parse_args(flags), world_size=world_size)
    with cuda_path_on_cpu() if cuda_path else runtime.using(runtime.current()):
        from megatron.training.training import Trainer

        trainer = Trainer(args)
        init_from_names(trainer)
        return {"optimizer": type(trainer.optimizer).__name__, "steps": [trainer.train_step()[:2] for _ in range(STEPS)]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU stand-in for the CUDA path")
def test_the_gpu_path_pipelines_as_the_cpu_path():
    """PP 2 through megatron-core's optimizer (its gradient norm over the model-parallel group, the
    pipeline stages included, and the tied embedding counted once) gives HostAdamW's losses and
    norms."""
    from tests.cuda_on_cpu import MAPPED_BACKEND

    flags = [*FLAGS, "--pipeline-model-parallel-size", "2"]
    gpu = run_world(2, gpu_path_worker, flags, True, backend=MAPPED_BACKEND)
    cpu = run_world(2, gpu_path_worker, flags, False)
    assert gpu[0]["optimizer"] == "ChainedOptimizer" and cpu[0]["optimizer"] == "HostAdamW"
    for r in gpu:
        for (loss, norm), (want_loss, want_norm) in zip(r["steps"], cpu[0]["steps"]):
            assert loss == pytest.approx(want_loss, rel=1e-6) and norm == pytest.approx(want_norm, rel=1e-5)
