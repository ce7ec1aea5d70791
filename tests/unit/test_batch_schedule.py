"""Megatron's batch ramp-up (megatron/training/batch_schedule.py): --rampup-batch-size against
megatron-core's own calculator, --step-batch-size-schedule against Megatron-LM's rules written out,
the LR schedule in samples against megatron-core's scheduler stepped by each batch, the refusals."""

import pytest
import torch
from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from megatron.training.batch_schedule import BatchSchedule
from megatron.training.data import MicroBatches
from tests.helpers import TINY


def config_of(*flags, world_size=1):
    return validate_args(parse_args([*TINY, *flags]), world_size=world_size)


def refusal(*flags, world_size=1) -> str:
    with pytest.raises(ArgumentError) as e:
        config_of(*flags, world_size=world_size)
    return str(e.value)


@pytest.mark.parametrize("start, increment, samples, final", [
    (16, 16, 5859375, 1536),  # Megatron-LM's GPT-3 recipe
    (1, 1, 10, 4), (2, 2, 7, 8), (4, 4, 100, 64), (3, 5, 1, 13), (2, 6, 1000, 20)])
def test_rampup_is_megatron_cores(start, increment, samples, final):
    ours = BatchSchedule.from_flags(rampup_batch_size=(start, increment, samples), step_batch_size_schedule=None,
                                    global_batch_size=final, seq_length=2048)
    theirs = RampupBatchsizeNumMicroBatchesCalculator(final, 1, 1, False, 0, start, increment, samples)
    counts = set(range(0, min(samples, 3000) + 3)) | {samples - 1, samples, samples + 1, 10**9}
    for first, _ in ours.batches():
        counts |= {first - 1, first, first + 1}
    for consumed in sorted(c for c in counts if c >= 0):
        theirs.update(consumed, consistency_check=False)
        assert ours.at(consumed) == theirs.get_current_global_batch_size(), consumed
    sizes = ours.batches()
    assert [s for _, s in sizes] == sorted({ours.at(c) for c in counts if c >= 0})
    assert sizes[0][1] == start and sizes[-1][1] == final
    for first, size in sizes:  # where each size starts, exactly
        assert ours.at(first) == size and (first == 0 or ours.at(first - 1) < size)


def test_rampup_over_no_samples_is_the_final_batch():
    """megatron-core's calculator divides by zero there; here it is the final batch from the start."""
    ours = BatchSchedule.from_flags(rampup_batch_size=(3, 5, 0), step_batch_size_schedule=None,
                                    global_batch_size=13, seq_length=8)
    assert [ours.at(c) for c in (0, 1, 100)] == [13, 13, 13]


def test_step_schedule_reads_megatron_lms_form():
    """The GPT-3 175B example's schedule: thresholds in tokens (K/M/B/T), 2048-token sequences."""
    text = "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"
    ours = BatchSchedule.from_flags(rampup_batch_size=None, step_batch_size_schedule=text, global_batch_size=1536,
                                    seq_length=2048)
    thresholds = [0, 2_400_000_000 // 2048, 4_800_000_000 // 2048, 7_200_000_000 // 2048, 9_600_000_000 // 2048,
                  12_000_000_000 // 2048]
    assert ours.batches() == tuple(zip(thresholds, [16, 320, 624, 928, 1232, 1536]))
    assert ours.final == 1536
    for threshold, size, previous in zip(thresholds[1:], [320, 624, 928, 1232, 1536], [16, 320, 624, 928, 1232]):
        assert ours.at(threshold - 1) == previous and ours.at(threshold) == size
    # unordered, comma-separated and with a decimal suffix, as Megatron-LM accepts
    again = BatchSchedule.from_flags(rampup_batch_size=None, step_batch_size_schedule="1.2k:8,0:4",
                                     global_batch_size=None, seq_length=100)
    assert again.batches() == ((0, 4), (12, 8)) and again.final == 8


def test_iterations_for_samples_follow_megatron_lm():
    steps = BatchSchedule.from_flags(rampup_batch_size=None, step_batch_size_schedule="0:2 512:4",
                                     global_batch_size=None, seq_length=128)
    # batches 2, 2, 4, 4, ...: consumed 0, 2, 4, 8, 12, 16, 20; Megatron-LM's step rule stops once
    # the samples are reached (a partial last batch counts)
    assert [steps.iterations_for_samples(n) for n in (1, 2, 4, 8, 9, 20)] == [1, 1, 2, 3, 4, 6]
    assert steps.samples_in(4) == 12
    rampup = BatchSchedule.from_flags(rampup_batch_size=(1, 1, 10), step_batch_size_schedule=None,
                                      global_batch_size=4, seq_length=128)
    # megatron-core's ramp-up: one increment per 10/3 samples
    assert [rampup.at(c) for c in (0, 3, 4, 6, 7, 9, 10, 11)] == [1, 1, 2, 2, 3, 3, 4, 4]
    # Megatron-LM's update_train_iters, written out: batches 1 1 1 1 2 2 3 while consumed <= 10
    # (consumed 1 2 3 4 6 8 11), then whole final batches of 4 (a partial one dropped)
    assert rampup.iterations_for_samples(40) == 7 + (40 - 11) // 4
    assert rampup.samples_in(7) == 11
    assert rampup.iterations_for_samples(5) == 5  # inside the ramp-up: stops once past the samples (at 6)


def test_lr_in_samples_is_megatron_lms():
    """With a ramp-up the scheduler counts samples and steps by each iteration's batch; iteration
    lengths are x the final batch (Megatron-LM's get_optimizer_param_scheduler)."""
    def scheduler(warmup, decay, total):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=warmup,
                                       lr_decay_steps=decay, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                       wd_incr_steps=total, wd_incr_style="constant")

    for flags, megatron in (
            (["--train-iters", "20", "--lr-decay-iters", "18", "--lr-warmup-fraction", "0.1"],
             dict(iters=20, warmup=0.1 * 18 * 8, decay=18 * 8)),
            (["--train-samples", "100", "--lr-warmup-samples", "9", "--lr-decay-samples", "90"],
             dict(iters=None, warmup=9, decay=90))):
        config = config_of(*flags, "--micro-batch-size", "2", "--global-batch-size", "8",
                           "--step-batch-size-schedule", "0:2 1024:4 2048:8", "--lr", "3e-4", "--min-lr", "3e-5",
                           "--lr-decay-style", "cosine")
        schedule = config.lr_schedule
        assert schedule.unit == "samples"
        assert (schedule.warmup_steps, schedule.decay_steps) == pytest.approx((megatron["warmup"],
                                                                                megatron["decay"]))
        batches = config.training.batch_schedule
        iters = megatron["iters"] or batches.iterations_for_samples(100)
        assert config.training.train_iters == iters
        ours = scheduler(schedule.warmup_steps, schedule.decay_steps, schedule.total_steps)
        theirs = scheduler(megatron["warmup"], megatron["decay"], megatron["decay"])
        consumed = 0
        for _ in range(iters):
            batch = config.global_batch_at(consumed)
            ours.step(increment=schedule.increment(batch))
            theirs.step(increment=batch)
            consumed += batch
            assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(theirs.optimizer.param_groups[0]["lr"],
                                                                          rel=1e-12)
        assert config.train_samples_total == consumed
    # a constant batch still counts iterations (the same schedule, as before)
    assert config_of("--train-iters", "5").lr_schedule.unit == "iterations"


def test_micro_batches_follow_the_batch_of_each_iteration():
    """Megatron's sampler order with a changing batch: global batch at consumed c is samples
    [c, c+G); micro batch m of data-parallel rank d starts at c + (m*D + d)*b."""
    dataset = [{k: torch.tensor([i]) for k in ("tokens", "labels", "loss_mask", "position_ids")} for i in range(64)]
    ranks = [MicroBatches(dataset, micro_batch_size=2, global_batch_size=8, dp_rank=d, dp_size=2) for d in range(2)]
    seen = []
    for size in (4, 4, 8, 8):
        per_rank = [[b["tokens"][:, 0].tolist() for b in r.global_batch(size)] for r in ranks]
        seen.append(sorted(i for micro in per_rank for m in micro for i in m))
        assert per_rank[1][0][0] == per_rank[0][0][0] + 2  # rank 1's micro batch follows rank 0's
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], list(range(8, 16)), list(range(16, 24))]


@pytest.mark.parametrize("flags, world, message", [
    (["--rampup-batch-size", "2", "2", "10", "--step-batch-size-schedule", "0:4"], 1,
     "give one of --rampup-batch-size and --step-batch-size-schedule"),
    (["--step-batch-size-schedule", "0:2 512:8"], 1, "--global-batch-size 4 and --step-batch-size-schedule"),
    (["--step-batch-size-schedule", "128:2 512:4"], 1, "the first threshold must be 0"),
    (["--step-batch-size-schedule", "0:2 2x:4"], 1, "is not a number"),
    (["--step-batch-size-schedule", "0:2 512"], 1, "is not THRESHOLD:BATCH"),
    (["--step-batch-size-schedule", "0:2 100:2 200:4"], 1, "two thresholds fall on sample 0"),
    (["--rampup-batch-size", "3", "2", "10"], 1, "must be the start batch 3 plus a whole number of increments"),
    (["--rampup-batch-size", "6", "2", "10"], 1, "must be the start batch 6"),
    # micro 2 x DP 2: the first batch of 2 does not split
    (["--step-batch-size-schedule", "0:2 512:4"], 2, "its batch of 2 (from 0 samples consumed) is not divisible "
                                                      "by --micro-batch-size x data-parallel size = 4"),
])
def test_bad_schedules_are_refused_with_what_to_change(flags, world, message):
    assert message in refusal(*flags, "--train-iters", "3", world_size=world)


def test_dry_run_describes_the_ramp_up(capsys):
    from megatron.training.training import describe_plan

    text = describe_plan(config_of("--train-samples", "20", "--step-batch-size-schedule", "0:2 512:4"))
    assert "ramp-up: global batch 2 from 0, 4 from 4 samples consumed" in text
    assert "20 samples in all" in text and "LR linear, warmup 0 and decay 20 samples" in text
