"""The trainer's loss mask and its normalisation over micro batches, against float64 sums.

FPDT and the baseline share this code (``Trainer._loss_terms`` and ``train_step``), so their
parity cannot catch a fault in it. One global batch of three micro batches whose loss masks
hold zeros: scattered zeros; an all-zero micro batch; and one whose masked-in tokens all sit
on FPDT rank 1 (rank 0's share of it is all zeros: its local count is 0, the sequence's is
not). Run as the baseline (1 process) and as FPDT 2 (2 processes, 4 chunks, offload on).

Expected, as Megatron-LM computes them (without --calculate-per-token-loss):

* the reported loss: the sum of the per-token losses of masked-in tokens over the global
  batch divided by the number of masked-in tokens (float64 here);
* the gradient: the mean over micro batches of each one's masked-in mean, so a micro batch
  counts 1/M however many tokens it has, and an all-zero one adds nothing (no NaN: Megatron
  divides 0 by 0 there; this trainer counts it as 0).

The reference takes the per-token losses and the gradient of each micro batch's masked-in
sum from the model itself (the model is not what is tested), picking masked-in tokens by
index, never by multiplying with the mask; the gradients are summed over the FPDT ranks
here, not by megatron-core's DDP, so a wrong DDP scale convention in the trainer would show.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.distributed as dist

from fpdt_ext.testing.spawn import run_world
from tests.helpers import TINY

SEQ, MICRO, NUM_MICRO, VOCAB = 128, 2, 3, 256
FLAGS = TINY + ["--micro-batch-size", str(MICRO), "--global-batch-size", str(MICRO * NUM_MICRO),
                "--train-iters", "1", "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "5"]
FPDT = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--fpdt-offload"]
FPDT_SIZE, SUB_CHUNK = 2, SEQ // (SEQ // 32 * 2)  # 4 chunks: sub-chunks of 16 tokens


def micro_batches():
    """[b, S] micro batches (tokens, labels, loss mask, positions), the same on every rank."""
    gen = torch.Generator().manual_seed(11)
    masks = [(torch.rand(MICRO, SEQ, generator=gen) > 0.3).float(),  # scattered zeros
             torch.zeros(MICRO, SEQ)]  # nothing to learn from
    on_rank1 = torch.zeros(MICRO, SEQ)  # rank r holds sub-chunks r, r+P, ...: only rank 1's masked in
    for sub in range(1, SEQ // SUB_CHUNK, FPDT_SIZE):
        on_rank1[:, sub * SUB_CHUNK:(sub + 1) * SUB_CHUNK] = 1.0
    on_rank1[1, :40] = 0.0
    masks.append(on_rank1)
    batches = []
    for mask in masks:
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
        batches.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                        "loss_mask": mask, "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).contiguous()})
    return batches


def trainer_worker(rank, world_size, flags):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.data import to_model_layout
    from megatron.training.training import Trainer

    trainer = Trainer(validate_args(parse_args(flags), world_size=world_size))
    batches = micro_batches()
    trainer.train_data = types.SimpleNamespace(global_batch=lambda size=None: iter(batches))
    params = dict(trainer.model.module.named_parameters())
    sp_group = trainer.groups.sp if world_size > 1 else None

    # the reference, before the step (same weights): per micro batch, the masked-in losses and
    # the gradient of their sum over the whole sequence
    loss_sums, token_counts, grad_sums, local_counts, all_sums = [], [], [], [], []
    for batch in batches:
        trainer.model.zero_grad_buffer()
        b = to_model_layout(batch, groups=trainer.groups, num_chunks=trainer.num_chunks, device=trainer.device)
        losses = trainer.model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [b, s/P]
        picked = losses[b["loss_mask"] != 0]
        picked.sum().backward()  # DDP's hooks accumulate main_grad; nothing is reduced before finalize
        totals = torch.tensor([picked.detach().double().sum().item(), float(picked.numel()),
                               losses.detach().double().sum().item()], dtype=torch.float64)
        local_counts.append(picked.numel())
        grads = {n: p.main_grad.detach().double().clone() for n, p in params.items()}
        if sp_group is not None:
            dist.all_reduce(totals, group=sp_group)
            for g in grads.values():
                dist.all_reduce(g, group=sp_group)
        loss_sums.append(totals[0].item())
        token_counts.append(totals[1].item())
        all_sums.append(totals[2].item())
        grad_sums.append(grads)

    loss, grad_norm, _ = trainer.train_step()
    return {"loss": loss, "grad_norm": grad_norm, "loss_sums": loss_sums, "token_counts": token_counts,
            "local_counts": local_counts, "grad_sums": grad_sums, "all_sums": all_sums,
            "grads": {n: p.main_grad.detach().double().clone() for n, p in params.items()}}


@functools.lru_cache(maxsize=None)
def run(kind):
    if kind == "baseline":
        return run_world(1, trainer_worker, FLAGS)
    return run_world(FPDT_SIZE, trainer_worker, FLAGS + FPDT)


@pytest.mark.parametrize("kind", ["baseline", "fpdt2"])
def test_masked_tokens_and_micro_batch_normalisation(kind):
    results = run(kind)
    r = results[0]
    masks = [b["loss_mask"] for b in micro_batches()]
    assert r["token_counts"] == [m.sum().item() for m in masks]
    assert r["token_counts"][1] == 0
    if kind == "fpdt2":  # the third micro batch leaves rank 0 with no masked-in token of its own
        assert results[0]["local_counts"][2] == 0 and results[1]["local_counts"][2] > 0
    # reported loss: sum over masked-in tokens / their number, over the global batch
    expected_loss = sum(r["loss_sums"]) / sum(r["token_counts"])
    assert r["loss"] == pytest.approx(expected_loss, rel=1e-6)
    unmasked = sum(r["all_sums"]) / (NUM_MICRO * MICRO * SEQ)  # what ignoring the mask would report
    assert abs(unmasked - expected_loss) > 1e-4 * expected_loss
    # gradient: mean over micro batches of each one's masked-in mean; the empty one adds 0
    expected = {n: sum(g[n] / t for g, t in zip(r["grad_sums"], r["token_counts"]) if t > 0) / NUM_MICRO
                for n in r["grads"]}
    scale = max(e.abs().max().item() for e in expected.values())
    for res in results:  # every rank holds the reduced gradient
        for n, want in expected.items():
            got = res["grads"][n]
            assert torch.isfinite(got).all(), n
            assert (got - want).abs().max().item() <= 1e-5 * scale, f"{n}: {(got - want).abs().max().item():.2e}"
    # the checks can fail: weighting micro batches by their tokens (sum / sum) is another gradient
    per_token = {n: sum(g[n] for g in r["grad_sums"]) / sum(r["token_counts"]) for n in r["grads"]}
    assert max((per_token[n] - expected[n]).abs().max().item() for n in expected) > 100 * 1e-5 * scale
