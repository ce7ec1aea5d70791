"""The CUDA-only branches, exercised on the CPU as far as their logic goes (docs/GPU_PATHS.md).

* the runtime picks the GPU's device and device-mapped backend when torch sees a GPU;
* every process group takes CPU and CUDA tensors (the device-mapped backend, inherited);
* the trainer's GPU path - megatron-core's DDP (with its distributed optimizer) and
  megatron-core's optimizer, built exactly as on a GPU, parameters initialised the GPU way -
  trains with tensors on the CPU (tests/cuda_on_cpu.py) and gives the CPU path's losses;
  its checkpoints resume exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from fpdt_ext import runtime
from fpdt_ext.testing.spawn import run_world
from tests.cuda_on_cpu import MAPPED_BACKEND, cuda_path_on_cpu
from tests.helpers import TINY, write_initial_weights

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-ins for CUDA paths; a GPU runs the real ones")

ARCH = ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0"]
TINY_LLAMA = TINY + ["--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "3e-3", "--lr-warmup-iters", "1",
                     "--clip-grad", "1.0", "--weight-decay", "0.1", "--seed", "7", "--train-iters", "4"] + ARCH + [
    "--recompute-granularity", "full", "--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32"]


def test_runtime_takes_the_gpu_and_the_device_mapped_backend_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    rt = runtime.Runtime.detect(local_rank=6)
    assert rt.cuda and rt.device == torch.device("cuda", 2) and rt.backend == "cpu:gloo,cuda:nccl"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert runtime.Runtime.detect().device == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.Runtime.detect() == runtime.Runtime(cuda=False, device=torch.device("cpu"), backend="gloo")


def _groups_worker(rank, world_size):
    from fpdt_ext.mcore import cpu_shims
    from fpdt_ext.mcore.parallel_state import initialize_fpdt_parallel

    cpu_shims.prepare()
    groups = initialize_fpdt_parallel(tensor_model_parallel_size=2, fpdt_parallel_size=2)
    pgs = groups.pg_collection
    seen = {}
    for name in ("tp", "cp", "dp", "dp_cp", "mp", "pp", "embd", "pos_embd", "tp_cp", "tp_dp_cp"):
        group = getattr(pgs, name, None)
        if group is None:
            continue
        config = dist.get_backend_config(group)
        total = torch.ones(1)  # a CPU tensor, as the trainer's object collectives and barriers use
        dist.all_reduce(total, group=group)
        seen[name] = (config, int(total.item()), group.size())
    return seen


def test_every_process_group_takes_cpu_and_cuda_tensors():
    """megatron-core's groups inherit the world's device-mapped backend: each maps both device
    types (a GPU run: cuda to NCCL, cpu to gloo), and a CPU tensor reduces over each."""
    for seen in run_world(4, _groups_worker, backend=MAPPED_BACKEND):
        assert {"tp", "cp", "dp", "dp_cp", "mp"} <= set(seen)
        for name, (config, total, size) in seen.items():
            assert "cpu:" in config and "cuda:" in config, (name, config)
            assert total == size, name


@functools.lru_cache(maxsize=None)
def _initial_weights(dtype: str) -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix=f"fpdt_init_{dtype}_")
    run_world(2, write_initial_weights, TINY_LLAMA + (["--bf16"] if dtype == "bf16" else []), path)
    return path


def _train_worker(rank, world_size, flags, steps, cuda_path, save=None, load=None):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import save_checkpoint

    extra = (["--save", save] if save else []) + (["--load", load] if load else [])
    args = validate_args(parse_args(flags + extra), world_size=world_size)
    path = cuda_path_on_cpu() if cuda_path else runtime.using(runtime.current())
    with path as mode:
        from megatron.training.training import Trainer

        trainer = Trainer(args)
        history = [trainer.train_step() for _ in range(steps)]
        if save:
            save_checkpoint(trainer, trainer.state.iteration)
        described = {
            "optimizer": type(trainer.optimizer).__name__,
            "inner": [type(o).__name__ for o in getattr(trainer.optimizer, "chained_optimizers", [])],
            "use_cpu_initialization": trainer.model.module.config.use_cpu_initialization,
            "ddp_distributed_optimizer": trainer.model.ddp_config.use_distributed_optimizer,
            "redirected": getattr(mode, "redirected", 0),
            "iteration": trainer.state.iteration,
            "params": {n: p.detach().float().clone() for n, p in trainer.model.module.named_parameters()},
        }
    return {"history": history, **described}


@functools.lru_cache(maxsize=None)
def _run(cuda_path: bool, extra: tuple, steps: int = 4):
    """Both paths start from the same weights (a weights-only checkpoint: the GPU path initialises
    its parameters differently, on the device with the model-parallel RNG)."""
    init = _initial_weights("bf16" if "--bf16" in extra else "fp32")
    return run_world(2, _train_worker, TINY_LLAMA + list(extra), steps, cuda_path, None, init,
                     backend=MAPPED_BACKEND if cuda_path else None)


@pytest.mark.parametrize("extra", [(), pytest.param(("--bf16",), marks=pytest.mark.slow),  # bf16: the next one too
                                   ("--bf16", "--use-distributed-optimizer")],
                         ids=["fp32", "bf16", "bf16-distributed-optimizer"])
def test_gpu_training_path_builds_megatron_optimizer_and_matches_the_cpu_path(extra):
    """The trainer's CUDA branch on FPDT 2: megatron-core's optimizer built with explicit
    process groups (megatron-core refuses gloo side groups there), DDP laid out for the distributed
    optimizer when asked, parameters initialised the GPU way; from the same weights its losses
    and gradient norms are the CPU path's (HostAdamW: the same AdamW, master weights, clipping
    and no-decay groups)."""
    gpu = _run(True, extra)
    cpu = _run(False, extra)
    for r in gpu:
        assert r["optimizer"] == "ChainedOptimizer", r["optimizer"]
        expected = "DistributedOptimizer" if "--use-distributed-optimizer" in extra else (
            "Float16OptimizerWithFloat16Params" if "--bf16" in extra else "FP32Optimizer")
        assert r["inner"] == [expected]
        assert r["use_cpu_initialization"] is False and r["redirected"] > 0
        assert r["ddp_distributed_optimizer"] == ("--use-distributed-optimizer" in extra)
    assert cpu[0]["optimizer"] == "HostAdamW"
    tol = 1e-6 if not extra else 1e-3
    for (g_loss, g_norm, _), (c_loss, c_norm, _) in zip(gpu[0]["history"], cpu[0]["history"]):
        assert g_loss == pytest.approx(c_loss, rel=tol)
        assert g_norm == pytest.approx(c_norm, rel=max(tol, 1e-4))
    for name, value in cpu[0]["params"].items():
        torch.testing.assert_close(gpu[0]["params"][name], value, rtol=tol, atol=tol, msg=name)
    assert gpu[0]["history"][-1][0] < gpu[0]["history"][0][0]


@pytest.mark.parametrize("cuda_path", [False, True], ids=["cpu-path", "gpu-path"])
def test_weights_only_load_in_bf16_trains_from_the_loaded_weights(cuda_path):
    """A weights-only checkpoint (converted, or a new stage) loaded into a bf16 run: the fp32
    master weights must come from the loaded weights (they were made from the random initial
    ones, and the first step wrote those back)."""
    loaded = _run(cuda_path, ("--bf16",), 1)[0]
    fresh = run_world(2, _train_worker, TINY_LLAMA + ["--bf16", "--seed", "8"], 1, cuda_path,
                      backend=MAPPED_BACKEND if cuda_path else None)[0]
    start = _run(cuda_path, ("--bf16",), 0)[0]["params"]  # the loaded weights, before any step
    for name, value in loaded["params"].items():  # one step of lr 3e-3 moves a weight by ~3e-3
        assert (value - start[name]).abs().max() < 1e-2, name
    assert any((fresh["params"][n] - start[n]).abs().max() > 1e-2 for n in start)


@pytest.mark.parametrize("extra", [("--bf16",), ("--bf16", "--use-distributed-optimizer")],
                         ids=["bf16", "bf16-distributed-optimizer"])
def test_gpu_training_path_checkpoints_resume_exactly(tmp_path, extra):
    """Save after 2 steps with megatron-core's optimizer (the GPU path; its state laid out to
    reshard), resume, and the next 2 steps are those of the uninterrupted run."""
    flags = TINY_LLAMA + list(extra)
    whole = _run(True, extra)[0]["history"]
    save = str(tmp_path / "ckpt")
    first = run_world(2, _train_worker, flags, 2, True, save, _initial_weights("bf16"), backend=MAPPED_BACKEND)
    second = run_world(2, _train_worker, flags, 2, True, None, save, backend=MAPPED_BACKEND)
    assert first[0]["iteration"] == 2 and second[0]["iteration"] == 4
    assert first[0]["history"] + second[0]["history"] == whole


@pytest.mark.parametrize("extra,fused", [
    (["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--hidden-dropout", "0"], False),
    ([], True), (["--disable-bias-linear"], True)], ids=["llama", "gpt", "dropout-without-bias"])
def test_gpu_path_fuses_bias_dropout_add_only_where_there_is_something_to_fuse(extra, fused):
    """megatron-core compiles its fused bias-dropout-add (torch.compile) in every process on first
    use: on the GPU path it is on only with a bias or dropout to fuse; never on the CPU path."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.models import transformer_config

    args = validate_args(parse_args(TINY + ["--train-iters", "4", "--micro-batch-size", "1", "--global-batch-size", "2"]
                                    + extra), world_size=2)
    with runtime.using(runtime.Runtime(cuda=True, device=torch.device("cpu"), backend=MAPPED_BACKEND)):
        assert transformer_config(args).bias_dropout_fusion is fused
        assert transformer_config(args).use_cpu_initialization is False
    assert transformer_config(args).bias_dropout_fusion is False


def test_a_checkpoint_from_the_cpu_path_is_refused_by_the_gpu_path_with_what_to_do(tmp_path):
    """HostAdamW (CPU) and megatron-core's optimizers (GPU) lay their state out differently: a
    resume across them is refused before loading, saying what to do (not with dist_checkpointing's
    key-mismatch traceback); with --no-load-optim the rest loads and the run continues."""
    save = str(tmp_path / "cpu")
    run_world(2, _train_worker, TINY_LLAMA, 1, False, save, None)
    with pytest.raises(RuntimeError, match="written by HostAdamW, and this run uses megatron-core's optimizer "
                                           r"\(GPU path\).*start from its weights alone"):
        run_world(2, _train_worker, TINY_LLAMA, 1, True, None, save, backend=MAPPED_BACKEND)
    # --no-load-optim loads the rest: the run continues after iteration 1 with a fresh optimizer
    moved = run_world(2, _train_worker, TINY_LLAMA + ["--no-load-optim"], 1, True, None, save, backend=MAPPED_BACKEND)
    assert [r["iteration"] for r in moved] == [2, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU stand-in for the CUDA path")
def test_the_cuda_path_harness_covers_code_that_runs_inside_backward():
    """Autograd hooks run inside ``tensor.backward()``, which is itself a torch function: the
    harness keeps its mode for them, so a hook's literal CUDA allocation (as megatron-core's
    FSDP buffers make) lands on the CPU instead of failing on a CPU build of torch."""
    from tests.cuda_on_cpu import cuda_path_on_cpu

    made = []
    with cuda_path_on_cpu() as mode:
        x = torch.ones(3, requires_grad=True)
        x.register_hook(lambda g: made.append(torch.zeros(1, device="cuda")) or g)
        (x * 2).sum().backward()
    assert made and made[0].device.type == "cpu" and mode.redirected >= 1
    assert torch.equal(x.grad, torch.full((3,), 2.0))
