"""--use-megatron-fsdp (megatron/training/megatron_fsdp.py): megatron-core's Megatron-FSDP and
distributed optimizer on the GPU path, run on the CPU under the CUDA-path harness
(tests/cuda_on_cpu.py, gloo standing in for NCCL), against the unsharded CPU path (megatron-core's
DDP and HostAdamW) from the same weights, fp32 over FPDT 2 (and FPDT 2 x DP 2).

Per iteration the loss, the gradient norm and every reduced gradient (assembled from the ranks'
row blocks) equal the unsharded run's, and so do the parameters after Adam, for each sharding
strategy. Each rank holds its share of what the strategy shards. Its checkpoints are this
project's torch_dist ones: a Megatron-FSDP run resumes exactly, at the same and at another size,
and its checkpoint continues unsharded on the CPU path (optimizer state included); the CPU path
maps the same flags onto the distributed optimizer and FSDP2.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fpdt_ext import runtime
from fpdt_ext.testing.spawn import run_world
from tests.cuda_on_cpu import MAPPED_BACKEND, cuda_path_on_cpu
from tests.helpers import TINY, write_initial_weights

STEPS = 3
FLAGS = TINY + ["--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "3e-3", "--lr-warmup-iters", "1",
                "--train-iters", "8", "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "5",
                "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type",
                "rope", "--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--mock-data"]
FSDP = ["--use-megatron-fsdp", "--use-distributed-optimizer", "--data-parallel-sharding-strategy"]


@functools.lru_cache(maxsize=None)
def _initial_weights(model: tuple = (), world: int = 2) -> str:
    """One set of starting weights for every run of the model (FLAGS and the ``model`` flags, over
    ``world`` ranks): the GPU path initialises its own otherwise."""
    import tempfile

    path = tempfile.mkdtemp(prefix="fpdt_mfsdp_init_")
    run_world(world, write_initial_weights, FLAGS + list(model), path)
    return path


def _rows_of_every_parameter(trainer, tensors: str) -> dict:
    """{(TP rank, name): (first row, this rank's rows)} of the parameters (``tensors="params"``)
    or their reduced gradients ("grads"): Megatron-FSDP's row blocks of the TP-local tensors, or
    the whole TP-local tensors unsharded."""
    from megatron.training import megatron_fsdp
    from megatron.training.sharding import local

    tp = trainer.groups.tp_rank
    if not megatron_fsdp.is_wrapped(trainer.model):  # whole tensors (FSDP2's gathered) from row 0
        def whole(t):
            return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double().clone()

        return {(tp, name): (0, whole(p if tensors == "params" else getattr(p, "main_grad", p.grad)))
                for name, p in trainer.model.module.named_parameters()}
    params = megatron_fsdp._sharded_params(trainer.model)
    offsets = megatron_fsdp._row_offsets(params, trainer.groups.dp_sp)
    out = {}
    for name, p in params.items():
        t = p if tensors == "params" else p.grad
        if t is None:  # a rank that holds no rows of this parameter has no gradient for it
            assert local(p).numel() == 0, name
            t = p
        out[tp, name] = (offsets[name], local(t).detach().double().clone())
    return out


def _worker(rank, world_size, flags, steps, cuda_path, save=None, load=None):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import save_checkpoint

    extra = (["--save", save] if save else []) + (["--load", load] if load else [])
    args = validate_args(parse_args(flags + extra), world_size=world_size)
    with cuda_path_on_cpu() if cuda_path else runtime.using(runtime.current()):
        from megatron.training.training import Trainer

        trainer = Trainer(args)
        from megatron.core import tensor_parallel

        tracker = {name: bytes(state.numpy()) for name, state in tensor_parallel.get_cuda_rng_tracker().get_states()
                   .items()}  # the model-parallel RNG (dropout in TP regions), as the model is built
        grads = []
        step = trainer.optimizer.step

        def recording_step():  # the reduced gradients, as the optimizer is about to use them
            grads.append(_rows_of_every_parameter(trainer, "grads"))
            return step()

        trainer.optimizer.step = recording_step
        history = [trainer.train_step() for _ in range(steps)]
        if save:
            save_checkpoint(trainer, trainer.state.iteration)
        from megatron.training.sharding import local

        inner = [o.optimizer for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])]
        held = {"adam": sum(local(v).numel() for o in inner for s in o.state.values() for k, v in s.items()
                            if k != "step"),
                "full": sum(p.numel() for p in trainer.model.module.parameters())}  # (a DTensor's: the whole)
        return {"history": [(loss, norm) for loss, norm, _ in history], "grads": grads,
                "params": _rows_of_every_parameter(trainer, "params"), "iteration": trainer.state.iteration,
                "wrapper": type(trainer.model).__name__, "optimizer": type(trainer.optimizer).__name__,
                "sharding": trainer.config.parallel, "held": held, "tracker": tracker, "tp": trainer.groups.tp_rank}


def _whole(ranks: list, pick) -> dict:
    """Whole tensors from each rank's (first row, rows)."""
    out = {}
    for r in ranks:
        for name, (row, rows) in pick(r).items():
            if name not in out:
                out[name] = {}
            out[name][row] = rows
    return {name: torch.cat([parts[k] for k in sorted(parts) if parts[k].numel()]) for name, parts in out.items()}


@functools.lru_cache(maxsize=None)
def _run(world: int, extra: tuple, cuda_path: bool, steps: int = STEPS, model: tuple = ()):
    """``steps`` iterations from the initial weights of the model (FLAGS and ``model``) with ``extra``."""
    return run_world(world, _worker, FLAGS + list(model) + list(extra), steps, cuda_path, None,
                     _initial_weights(model, world), backend=MAPPED_BACKEND if cuda_path else None)


def _assert_same_training(got: list, want: list) -> None:
    for (g_loss, g_norm), (w_loss, w_norm) in zip(got[0]["history"], want[0]["history"]):
        assert g_loss == pytest.approx(w_loss, rel=1e-6)
        assert g_norm == pytest.approx(w_norm, rel=1e-5)
    for step in range(STEPS):
        have = _whole(got, lambda r: r["grads"][step])
        ref = _whole(want, lambda r: r["grads"][step])
        assert have.keys() == ref.keys()
        scale = max(g.abs().max().item() for g in ref.values())
        for name in ref:
            assert (have[name] - ref[name]).abs().max().item() <= 1e-5 * scale, (step, name)
    have, ref = _whole(got, lambda r: r["params"]), _whole(want, lambda r: r["params"])
    for name in ref:
        assert (have[name] - ref[name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("strategy", ["optim", "optim_grads", "optim_grads_params"])
def test_megatron_fsdp_trains_as_the_unsharded_run(strategy):
    """FPDT 2: megatron-core's FullyShardedDataParallel and distributed optimizer on the GPU path
    give the unsharded CPU path's losses, gradient norms, gradients and parameters; each rank
    holds half of the Adam state."""
    got = _run(2, (*FSDP, strategy), True)
    want = _run(2, (), False)
    assert {r["wrapper"] for r in got} == {"FullyShardedDataParallel"}
    assert {r["optimizer"] for r in got} == {"MegatronFSDPOptimizer"}
    _assert_same_training(got, want)
    assert got[0]["history"][-1][0] < got[0]["history"][0][0]
    for r in got:
        assert r["held"]["adam"] == pytest.approx(2 * r["held"]["full"] / 2, rel=0.05)  # 2 moments over 2 ranks


@pytest.mark.slow
def test_megatron_fsdp_trains_the_baseline_model_over_data_ranks_with_gradient_accumulation():
    """megatron-core's own GPTModel (no FPDT) over DP 2, two micro batches per step."""
    i = FLAGS.index("--fpdt")
    assert FLAGS[i:i + 5] == ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32"]
    plain = FLAGS[:i] + FLAGS[i + 5:] + ["--global-batch-size", "4"]
    got = run_world(2, _worker, plain + [*FSDP, "optim_grads_params"], STEPS, True, None, None,
                    backend=MAPPED_BACKEND)
    want = run_world(2, _worker, plain, STEPS, True, None, None, backend=MAPPED_BACKEND)
    _assert_same_training(got, want)


def test_megatron_fsdp_composes_with_fpdt_offload_and_full_recompute():
    """FPDT's chunks offloaded to host memory, every layer recomputed in its backward (megatron-core's
    checkpoint: a backward inside the backward) with its input offloaded too."""
    extra = ("--fpdt-offload", "--recompute-granularity", "full", "--offload-recompute-inputs")
    _assert_same_training(_run(2, (*FSDP, "optim_grads_params", *extra), True), _run(2, extra, False))


@pytest.mark.slow
def test_megatron_fsdp_over_fpdt_and_data_ranks_trains_as_the_unsharded_run():
    """FPDT 2 x DP 2 (4 processes): shards over all four data x FPDT ranks."""
    got = _run(4, (*FSDP, "optim_grads_params"), True)
    _assert_same_training(got, _run(4, (), False))


TP2 = ("--tensor-model-parallel-size", "2")


@pytest.mark.parametrize("strategy", [pytest.param("optim", marks=pytest.mark.slow),
                                      pytest.param("optim_grads", marks=pytest.mark.slow), "optim_grads_params"])
def test_megatron_fsdp_with_tensor_parallelism_trains_as_the_unsharded_run(strategy):
    """TP 2 x FPDT 2 (4 processes): megatron-core's mesh is data x context x TP, each TP rank's
    parameters sharded over its two FPDT ranks; the unsharded TP 2 run's losses, gradients and
    parameters, and half of its Adam state per rank. (megatron-core 0.16's adapter needed
    TransformerEngine to build a TP wrapper until megatron_fsdp._te_linear_type.)"""
    got, want = _run(4, (*FSDP, strategy), True, model=TP2), _run(4, (), False, model=TP2)
    assert {r["wrapper"] for r in got} == {"FullyShardedDataParallel"}
    _assert_same_training(got, want)
    for r, w in zip(got, want):
        assert r["held"]["adam"] == pytest.approx(w["held"]["adam"] / 2, rel=0.05)
        # each TP rank keeps its own model-parallel RNG (megatron-core's wrapper gives it TP rank 0's)
        assert r["tracker"] != next(o["tracker"] for o in got if o["tp"] != r["tp"])


def test_a_tensor_parallel_megatron_fsdp_checkpoint_resumes_exactly_and_loads_without_tp(tmp_path):
    """TP 2 x FPDT 2 with optim_grads_params, saved after 2 steps: resumed for the third step it
    gives the uninterrupted run's loss exactly, and the unsharded FPDT 2 run without TP continues
    it (each rank's rows of its TP slice were saved at their place in the whole tensor)."""
    flags, saved = FLAGS + list(TP2) + [*FSDP, "optim_grads_params"], str(tmp_path / "tp2")
    whole = _run(4, (*FSDP, "optim_grads_params"), True, model=TP2)[0]["history"]
    first = run_world(4, _worker, flags, 2, True, saved, _initial_weights(TP2, 4), backend=MAPPED_BACKEND)
    second = run_world(4, _worker, flags, 1, True, None, saved, backend=MAPPED_BACKEND)
    assert first[0]["history"] + second[0]["history"] == whole
    _close(run_world(2, _worker, FLAGS, 1, False, None, saved)[0]["history"], whole[2:], rel=1e-5)


@pytest.mark.parametrize("flags, expected", [
    pytest.param((*FSDP, "optim"), dict(use_distributed_optimizer=True, use_torch_fsdp2=False),
                 marks=pytest.mark.slow),
    pytest.param((*FSDP, "optim_grads"), dict(use_distributed_optimizer=False, use_torch_fsdp2=True,
                                              fsdp_reshard_after_forward=False), marks=pytest.mark.slow),
    ((*FSDP, "optim_grads_params"), dict(use_distributed_optimizer=False, use_torch_fsdp2=True,
                                         fsdp_reshard_after_forward=True)),
    (("--use-torch-fsdp2",), dict(use_torch_fsdp2=True))], ids=["optim", "optim_grads", "optim_grads_params",
                                                                "torch-fsdp2"])
def test_on_the_cpu_the_same_flags_shard_by_this_projects_implementations(flags, expected):
    """Megatron-FSDP needs CUDA streams: on the CPU path the strategy maps onto the distributed
    optimizer (optim) or FSDP2 (the others), which train as the unsharded run from the same
    weights-only checkpoint. (FSDP2 loaded a weights-only checkpoint's SwiGLU ``fc1`` in
    megatron-core's TP layout, not its own, until 2026-12-01: 0.02% off in the first loss.)"""
    got = _run(2, flags, False)
    for r in got:
        assert r["wrapper"] != "FullyShardedDataParallel" and not r["sharding"].use_megatron_fsdp
        for field, value in expected.items():
            assert getattr(r["sharding"], field) == value, field
    for (g_loss, g_norm), (w_loss, w_norm) in zip(got[0]["history"], _run(2, (), False)[0]["history"]):
        assert g_loss == pytest.approx(w_loss, rel=1e-6) and g_norm == pytest.approx(w_norm, rel=1e-5)


def _close(got, want, rel=1e-6):
    for (g_loss, g_norm), (w_loss, w_norm) in zip(got, want):
        assert g_loss == pytest.approx(w_loss, rel=rel) and g_norm == pytest.approx(w_norm, rel=max(rel, 1e-5))


def _hf_export(load_dir, save_dir) -> dict:
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--model-type", "llama", "--loader", "mcore",
                           "--saver", "hf", "--load-dir", str(load_dir), "--save-dir", str(save_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(save_dir / "model.safetensors"))


def test_megatron_fsdp_checkpoints_resume_exactly_load_unsharded_and_export(tmp_path):
    """Saved after 2 steps and resumed for 2 more: the uninterrupted run's losses and gradient
    norms, exactly. The checkpoint continues on the unsharded CPU path (HostAdamW, optimizer state
    included: its layout is HostAdamW's) with them too; the unsharded run's checkpoint continues
    under Megatron-FSDP; both export to the same Hugging Face weights."""
    flags, init = FLAGS + [*FSDP, "optim_grads_params"], _initial_weights()
    whole = run_world(2, _worker, flags, 4, True, None, init, backend=MAPPED_BACKEND)[0]["history"]
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    first = run_world(2, _worker, flags, 2, True, str(sharded), init, backend=MAPPED_BACKEND)
    second = run_world(2, _worker, flags, 2, True, None, str(sharded), backend=MAPPED_BACKEND)
    assert first[0]["iteration"] == 2 and second[0]["iteration"] == 4
    assert first[0]["history"] + second[0]["history"] == whole
    _close(run_world(2, _worker, FLAGS, 2, False, None, str(sharded))[0]["history"], whole[2:])
    run_world(2, _worker, FLAGS, 2, False, str(plain), init)
    _close(run_world(2, _worker, flags, 2, True, None, str(plain), backend=MAPPED_BACKEND)[0]["history"], whole[2:])
    exported, reference = _hf_export(sharded, tmp_path / "hf_sharded"), _hf_export(plain, tmp_path / "hf_plain")
    assert exported.keys() == reference.keys() and len(exported) > 10
    for name, want in reference.items():
        torch.testing.assert_close(exported[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_a_bf16_megatron_fsdp_run_resumes_exactly_and_continues_unsharded(tmp_path):
    """bf16: the float32 master weights (the sharded parameters) are saved as HostAdamW saves them,
    so the run resumes bit for bit and the unsharded bf16 run continues it (bf16's precision)."""
    flags, init = FLAGS + ["--bf16", *FSDP, "optim_grads_params"], _initial_weights()
    whole = run_world(2, _worker, flags, 3, True, None, init, backend=MAPPED_BACKEND)[0]["history"]
    saved = str(tmp_path / "bf16")
    first = run_world(2, _worker, flags, 1, True, saved, init, backend=MAPPED_BACKEND)[0]["history"]
    second = run_world(2, _worker, flags, 2, True, None, saved, backend=MAPPED_BACKEND)[0]["history"]
    assert first + second == whole
    _close(run_world(2, _worker, FLAGS + ["--bf16"], 2, False, None, saved)[0]["history"], whole[1:], rel=1e-3)


@pytest.mark.slow
def test_a_megatron_fsdp_checkpoint_loads_over_another_number_of_ranks(tmp_path):
    """Saved over 2 ranks (FPDT 2), loaded over 4 (FPDT 2 x DP 2): each rank's rows of every
    parameter are the saved ones (the shards' places differ: they are uneven row blocks)."""
    flags, saved = FLAGS + [*FSDP, "optim_grads_params"], str(tmp_path / "two")
    two = run_world(2, _worker, flags, 2, True, saved, _initial_weights(), backend=MAPPED_BACKEND)
    four = run_world(4, _worker, flags, 0, True, None, saved, backend=MAPPED_BACKEND)
    want, got = _whole(two, lambda r: r["params"]), _whole(four, lambda r: r["params"])
    assert four[0]["iteration"] == 2 and got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_an_optimizer_megatron_core_builds_on_transformer_engine_or_apex_is_refused_naming_it():
    """With TransformerEngine or apex installed megatron-core steps with their FusedAdam, whose state
    (its step per group) the checkpoints here do not read yet: refused at start, not saved wrongly."""
    import types

    from megatron.training.megatron_fsdp import MegatronFSDPOptimizer

    class FusedAdam(torch.optim.SGD):
        pass

    inner = types.SimpleNamespace(optimizer=FusedAdam([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(ValueError, match="built its optimizer on FusedAdam .* use --use-torch-fsdp2"):
        MegatronFSDPOptimizer(inner, [], torch.bfloat16)
    adam = types.SimpleNamespace(optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))
    assert MegatronFSDPOptimizer(adam, [], torch.bfloat16).inner_optimizers() == [adam.optimizer]
