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
    offsets = megatron_fsdp._row_layout(params, trainer.groups.dp_sp)[0]
    out = {}
    for name, p in params.items():
        t = p if tensors == "params" else p.grad
        if t is None:  # a rank that holds no rows of this parameter has no gradient for it
            assert local(p).numel() == 0, name
            t = p
        out[tp, name] = (offsets[name], local(t).detach().double().clone())
    return out


class FusedAdam(torch.optim.Optimizer):
    """A stand-in of TransformerEngine's and apex's FusedAdam, which need their CUDA kernels: AdamW
    (torch's arithmetic) with their state layout: the moments per parameter, made at the first
    step, and the step count per parameter group."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True):
        assert adam_w_mode  # megatron-core asks for decoupled weight decay
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        import math

        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (beta1, beta2), t = group["betas"], group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def _megatron_core_steps_with_fused_adam():
    """What megatron-core's optimizer modules hold with TransformerEngine or apex installed."""
    from megatron.core import optimizer
    from megatron.core.optimizer import distrib_optimizer

    optimizer.Adam = distrib_optimizer.Adam = FusedAdam
    optimizer.USING_PYTORCH_OPTIMIZER = False


def _worker(rank, world_size, flags, steps, cuda_path, save=None, load=None, fused_adam=False):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import save_checkpoint

    if fused_adam:
        _megatron_core_steps_with_fused_adam()

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
        kinds = sorted({type(o).__name__ for o in inner})
        held = {"adam": sum(local(v).numel() for o in inner for s in o.state.values() for k, v in s.items()
                            if k != "step"),
                "full": sum(p.numel() for p in trainer.model.module.parameters())}  # (a DTensor's: the whole)
        return {"history": [(loss, norm) for loss, norm, _ in history], "grads": grads,
                "params": _rows_of_every_parameter(trainer, "params"), "iteration": trainer.state.iteration,
                "wrapper": type(trainer.model).__name__, "optimizer": type(trainer.optimizer).__name__,
                "sharding": trainer.config.parallel, "held": held, "tracker": tracker, "tp": trainer.groups.tp_rank,
                "inner": kinds}


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
    """TP 2 x FPDT 2 with optim_grads_params, saved after a step: resumed for two more it gives
    the uninterrupted run's losses exactly, and the unsharded FPDT 2 run without TP continues it
    (each rank's rows of its TP slice, and of its Adam state, were saved at their place in the
    whole tensor)."""
    flags, saved = FLAGS + list(TP2) + [*FSDP, "optim_grads_params"], str(tmp_path / "tp2")
    whole = _run(4, (*FSDP, "optim_grads_params"), True, model=TP2)[0]["history"]
    # two steps after each load: the second one's loss shows the first one's update (the optimizer state)
    first = run_world(4, _worker, flags, 1, True, saved, _initial_weights(TP2, 4), backend=MAPPED_BACKEND)
    second = run_world(4, _worker, flags, 2, True, None, saved, backend=MAPPED_BACKEND)
    assert first[0]["history"] + second[0]["history"] == whole
    _close(run_world(2, _worker, FLAGS, 2, False, None, saved)[0]["history"], whole[1:], rel=1e-5)


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


def test_with_fused_adams_state_layout_it_trains_resumes_exactly_and_continues_unsharded(tmp_path):
    """With TransformerEngine or apex installed megatron-core steps with their FusedAdam, whose step
    count is per parameter group (a stand-in of that layout here: theirs need CUDA). It trains as
    torch's AdamW does; its checkpoint resumes exactly (the step restored: Adam's bias correction
    reads it) and continues on the unsharded CPU path; an unsharded checkpoint continues under it."""
    flags, init, mapped = FLAGS + [*FSDP, "optim_grads_params"], _initial_weights(), MAPPED_BACKEND
    whole = run_world(2, _worker, flags, 4, True, None, init, True, backend=mapped)
    assert {tuple(r["inner"]) for r in whole} == {("FusedAdam",)}
    whole = whole[0]["history"]
    _close(whole[:STEPS], _run(2, (*FSDP, "optim_grads_params"), True)[0]["history"])
    fused, plain = str(tmp_path / "fused"), str(tmp_path / "plain")
    # two steps after each load: the second one's loss shows the first one's update (and its step count)
    first = run_world(2, _worker, flags, 2, True, fused, init, True, backend=mapped)[0]["history"]
    second = run_world(2, _worker, flags, 2, True, None, fused, True, backend=mapped)[0]["history"]
    assert first + second == whole
    _close(run_world(2, _worker, FLAGS, 2, False, None, fused)[0]["history"], whole[2:])
    run_world(2, _worker, FLAGS, 2, False, plain, init)
    _close(run_world(2, _worker, flags, 2, True, None, plain, True, backend=mapped)[0]["history"], whole[2:])


def test_an_optimizer_state_the_checkpoints_do_not_read_is_refused_naming_it():
    """A FusedAdam keeping its own master weights (TransformerEngine's precision-aware mode), or
    megatron-core's SGD: refused at start, not saved wrongly."""
    import types

    from megatron.training.megatron_fsdp import MegatronFSDPOptimizer

    param = torch.nn.Parameter(torch.zeros(2))
    precision_aware = FusedAdam([param])
    precision_aware.master_weights = True
    for optimizer in (precision_aware, torch.optim.SGD([param], lr=0.1)):
        name = type(optimizer).__name__
        with pytest.raises(ValueError, match=f"built its optimizer on {name}, whose state .* use --use-torch-fsdp2"):
            MegatronFSDPOptimizer(types.SimpleNamespace(optimizer=optimizer), [], torch.bfloat16)
    for optimizer in (FusedAdam([param]), torch.optim.AdamW([param])):
        inner = types.SimpleNamespace(optimizer=optimizer)
        assert MegatronFSDPOptimizer(inner, [], torch.bfloat16).inner_optimizers() == [optimizer]
