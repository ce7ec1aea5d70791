"""HostAdamW (the CPU path's optimizer) and its LR schedule against torch's own pieces.

FPDT and the baseline train through the same optimizer, so their parity cannot catch a fault
in it. Here ``build_optimizer`` is given Megatron's flags (warmup then cosine decay, betas,
eps, weight decay, clipping) and stepped on fixed gradients; the reference is written from
torch only: ``torch.nn.utils.clip_grad_norm_`` then ``torch.optim.AdamW`` (the single-tensor
implementation; HostAdamW uses the fused one), the learning rate of each step from
Megatron's formulas written out here, and weight decay on every parameter except biases and
norm weights, decided by name (Megatron's convention), not by shape as the code does.

The gradient norms differ from step to step (some clipped, some not), since Adam's update is
invariant to a constant gradient scale: a clip applied wrongly on every step would go unseen.
For each thing checked, a reference without it (no clipping; decay on every parameter) is
asserted to be far outside the tolerance, so the comparison can fail.

bf16: the model's parameters are bf16, the gradients fp32 in ``main_grad`` (megatron-core's
DDP buffer, ``grad_reduce_in_fp32``); the reference keeps fp32 master weights, which must
match HostAdamW's to fp32 precision (weights updated in bf16 would be off by bf16 roundings,
~1e-3), and the model's weights must be those masters rounded to bf16.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from fpdt_ext import runtime

STEPS, WARMUP = 7, 2
FLAGS = dict(lr=2e-2, min_lr=2e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, clip_grad=1.0)
# the gradient norm of each step as a multiple of --clip-grad: clipped, not, clipped harder, ...
NORM_OVER_CLIP = (7.0, 0.3, 30.0, 0.6, 3.0, 0.05, 12.0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(11, 8)
        self.linear = nn.Linear(8, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5, bias=False)
        with torch.no_grad():  # norm parameters away from 1 and 0, so decay on them shows
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)


def no_weight_decay(name: str) -> bool:
    """Megatron's convention: biases and normalisation weights are not decayed."""
    return name.endswith(".bias") or name.startswith("norm.")


def megatron_lr(num_steps: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """Linear warmup from 0, then cosine decay to ``min_lr`` at ``decay`` steps."""
    if num_steps <= warmup:
        return lr * num_steps / warmup
    ratio = (num_steps - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)


def _config(bf16: bool):
    from megatron.training.arguments import parse_args, validate_args

    flags = ["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "8",
             "--micro-batch-size", "1", "--mock-data", "--vocab-size", "16", "--train-iters", str(STEPS),
             "--lr-warmup-iters", str(WARMUP), "--lr-decay-style", "cosine"]
    for key, value in FLAGS.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return validate_args(parse_args(flags + (["--bf16"] if bf16 else [])), world_size=1)


def _gradients(model, seed):
    """Fixed gradients per step with the global norms of NORM_OVER_CLIP."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for scale in NORM_OVER_CLIP:
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))
        steps.append({n: g * (scale * FLAGS["clip_grad"] / norm) for n, g in grads.items()})
    return steps


def reference(initial, grads, *, clip=True, decay_all=False):
    """fp32 weights after each step, by torch's clip_grad_norm_ and AdamW; and the norms."""
    params = {n: p.detach().float().clone().requires_grad_() for n, p in initial.items()}
    decayed = {n: decay_all or not no_weight_decay(n) for n in params}
    decay = [p for n, p in params.items() if decayed[n]]
    no_decay = [p for n, p in params.items() if not decayed[n]]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=FLAGS["weight_decay"]),
                             dict(params=no_decay, weight_decay=0.0)],
                            betas=(FLAGS["adam_beta1"], FLAGS["adam_beta2"]), eps=FLAGS["adam_eps"],
                            foreach=False, fused=False)
    history, norms = [], []
    for step, step_grads in enumerate(grads):
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        total = torch.nn.utils.clip_grad_norm_(list(params.values()), FLAGS["clip_grad"] if clip else math.inf)
        norms.append(total.item())
        for group in opt.param_groups:  # the trainer steps the scheduler after the optimizer
            group["lr"] = megatron_lr(step, FLAGS["lr"], FLAGS["min_lr"], WARMUP, STEPS)
        opt.step()
        history.append({n: p.detach().clone() for n, p in params.items()})
    return history, norms


def _host_adamw_run(bf16, monkeypatch):
    from megatron.core import parallel_state
    from megatron.training.optimizer import HostAdamW, build_optimizer

    # one process is tensor-parallel rank 0 (the gradient norm asks megatron-core's global state)
    monkeypatch.setattr(parallel_state, "_MPU_TENSOR_MODEL_PARALLEL_RANK", 0)
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16 if bf16 else torch.float32)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _gradients(model, seed=1)
    cpu = runtime.Runtime(cuda=False, device=torch.device("cpu"), backend=runtime.CPU_BACKEND)
    with runtime.using(cpu):
        optimizer, scheduler = build_optimizer(_config(bf16), model, types.SimpleNamespace(tp=None, dp_sp=None))
    assert isinstance(optimizer, HostAdamW)
    masters = {n: next(m for m, p in optimizer._pairs if p is param) for n, param in model.named_parameters()}
    history, norms, lrs = [], [], []
    for step_grads in grads:
        optimizer.zero_grad()
        for n, p in model.named_parameters():
            if bf16:  # DDP's fp32 buffer
                p.main_grad = step_grads[n].clone()
            else:
                p.grad = step_grads[n].clone()
        lrs.append({g["lr"] for g in optimizer.param_groups})
        ok, norm, _ = optimizer.step()
        assert ok
        scheduler.step(increment=1)
        norms.append(norm)
        history.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                        {n: m.detach().clone() for n, m in masters.items()}))
    return initial, grads, history, norms, lrs


def _max_diff(a, b):
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-fp32-masters"])
def test_host_adamw_matches_torch_clip_and_adamw_over_steps(bf16, monkeypatch):
    initial, grads, history, norms, lrs = _host_adamw_run(bf16, monkeypatch)
    ref, ref_norms = reference(initial, grads)
    # the schedule: one learning rate for both groups, Megatron's warmup + cosine values
    assert all(len(lr) == 1 for lr in lrs), lrs
    assert [lr.pop() for lr in lrs] == pytest.approx(
        [megatron_lr(k, FLAGS["lr"], FLAGS["min_lr"], WARMUP, STEPS) for k in range(STEPS)], rel=1e-12)
    # the global gradient norm before clipping, every step; clipping active on some steps only
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    assert {n > FLAGS["clip_grad"] for n in norms} == {True, False}
    tol = 2e-6  # fp32 rounding of fused vs single-tensor AdamW over STEPS steps (updates ~lr)
    for step, ((weights, masters), want) in enumerate(zip(history, ref)):
        diff = _max_diff(masters, want)
        assert diff < tol, f"step {step}: fp32 weights differ from torch's by {diff:.2e}"
        if bf16:
            for n, w in weights.items():  # the model holds the master, rounded once
                assert w.dtype == torch.bfloat16
                assert torch.equal(w, masters[n].to(torch.bfloat16)), n
    # each checked feature changes the result far beyond the tolerance, so the checks can fail
    final = history[-1][1]
    unclipped, _ = reference(initial, grads, clip=False)
    decay_all, _ = reference(initial, grads, decay_all=True)
    assert _max_diff(final, unclipped[-1]) > 100 * tol
    for n in initial:  # decay on a no-decay parameter would move it by ~lr * wd * |p| per step
        if no_weight_decay(n):
            assert (final[n] - decay_all[-1][n]).abs().max() > 100 * tol, n
    if bf16:  # the masters hold what bf16 cannot (updating bf16 weights in place would lose it)
        weights = history[-1][0]
        assert _max_diff(final, weights) > 100 * tol


def test_weight_decay_groups_follow_megatron_convention(monkeypatch):
    """Which parameters the optimizer decays, read from its groups after the scheduler set
    their weight decay: biases and norm weights 0, every matrix (embedding included) --weight-decay."""
    from megatron.core import parallel_state
    from megatron.training.optimizer import build_optimizer

    monkeypatch.setattr(parallel_state, "_MPU_TENSOR_MODEL_PARALLEL_RANK", 0)
    model = Tiny()
    cpu = runtime.Runtime(cuda=False, device=torch.device("cpu"), backend=runtime.CPU_BACKEND)
    with runtime.using(cpu):
        optimizer, _ = build_optimizer(_config(False), model, types.SimpleNamespace(tp=None, dp_sp=None))
    decay_of = {id(m): g["weight_decay"] for g in optimizer.param_groups for m in g["params"]}
    got = {n: decay_of[id(p)] for n, p in model.named_parameters()}  # fp32: the masters are the parameters
    want = {n: 0.0 if no_weight_decay(n) else FLAGS["weight_decay"] for n, _ in model.named_parameters()}
    assert got == want
