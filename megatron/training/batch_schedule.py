"""The global batch as the run goes: Megatron's batch ramp-up.

Two of Megatron's flags make the global batch grow with the samples consumed:

    --rampup-batch-size START INCREMENT SAMPLES
        megatron-core's RampupBatchsizeNumMicroBatchesCalculator (megatron-core 0.16): from START,
        INCREMENT more every SAMPLES / ((G - START) / INCREMENT) samples, G (--global-batch-size)
        after SAMPLES.
    --step-batch-size-schedule "THRESHOLD:BATCH ..."
        Megatron-LM's step schedule (its StepBatchsizeNumMicroBatchesCalculator; megatron-core 0.16
        does not have it): BATCH from THRESHOLD tokens consumed on. Thresholds and batches take the
        suffixes K, M, B, T (10^3 ... 10^12); thresholds count tokens and become samples of
        --seq-length tokens (rounded down), as Megatron-LM's training does.

The batch of an iteration is a function of the samples consumed before it, so a resumed run
continues exactly. With either flag the LR scheduler counts samples and steps by each iteration's
batch, as Megatron-LM's does (config.lr_schedule).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _number(text: str, what: str) -> int:
    """``text`` with an optional K/M/B/T suffix, as an int (Megatron-LM's reading: "2.4B")."""
    body, scale = text.strip().upper(), 1
    if body[-1:] in _SUFFIXES:
        body, scale = body[:-1], _SUFFIXES[body[-1]]
    try:
        value = float(body) * scale
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number (K, M, B and T suffixes allowed)") from None
    if value < 0 or value != value:
        raise ValueError(f"{what} {text!r} must not be negative")
    return int(value)


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
    """The global batch for every count of consumed samples: ``at(consumed)``."""

    final: int  # the batch after the ramp-up (--global-batch-size)
    steps: Tuple[Tuple[int, int], ...] = ()  # (from consumed samples, batch), a step schedule
    rampup: Optional[Tuple[int, int, int]] = None  # (start, increment, samples)
    flag: str = ""  # how the user wrote it, for messages

    @classmethod
    def from_flags(cls, *, rampup_batch_size: Optional[Sequence[int]], step_batch_size_schedule: Optional[str],
                   global_batch_size: Optional[int], seq_length: int) -> Optional["BatchSchedule"]:
        """The schedule the flags give (None: a constant batch). Raises ValueError with what to change."""
        if rampup_batch_size is not None and step_batch_size_schedule is not None:
            raise ValueError("give one of --rampup-batch-size and --step-batch-size-schedule")
        if rampup_batch_size is not None:
            return cls._rampup(rampup_batch_size, global_batch_size)
        if step_batch_size_schedule is not None:
            return cls._steps(step_batch_size_schedule, global_batch_size, seq_length)
        return None

    @classmethod
    def _rampup(cls, values: Sequence[int], global_batch_size: Optional[int]) -> "BatchSchedule":
        flag = "--rampup-batch-size " + " ".join(str(v) for v in values)
        if len(values) != 3:
            raise ValueError(f"{flag}: give three numbers, START INCREMENT SAMPLES")
        start, increment, samples = (int(v) for v in values)
        if global_batch_size is None:
            raise ValueError(f"{flag} needs --global-batch-size, the batch it ramps up to")
        if start < 1 or increment < 1 or samples < 0:
            raise ValueError(f"{flag}: the start batch and the increment must be positive and the ramp-up "
                             f"samples not negative")
        if start > global_batch_size or (global_batch_size - start) % increment:
            raise ValueError(f"{flag}: --global-batch-size {global_batch_size} must be the start batch {start} "
                             f"plus a whole number of increments of {increment}")
        if start == global_batch_size or samples == 0:  # nothing to ramp (megatron-core divides by zero)
            return cls(final=global_batch_size, flag=flag)
        return cls(final=global_batch_size, rampup=(start, increment, samples), flag=flag)

    @classmethod
    def _steps(cls, text: str, global_batch_size: Optional[int], seq_length: int) -> "BatchSchedule":
        flag = f"--step-batch-size-schedule {text!r}"
        steps = []
        for entry in text.replace(",", " ").split():
            threshold, sep, batch = entry.partition(":")
            if not sep:
                raise ValueError(f"{flag}: {entry!r} is not THRESHOLD:BATCH (e.g. \"0:16 2.4B:320\")")
            steps.append((_number(threshold, f"{flag}: threshold") // seq_length,
                          _number(batch, f"{flag}: batch size")))
        if not steps:
            raise ValueError(f"{flag}: give THRESHOLD:BATCH pairs (e.g. \"0:16 2.4B:320\")")
        steps.sort()
        if steps[0][0] != 0:
            raise ValueError(f"{flag}: the first threshold must be 0 (the batch to start with)")
        for (a, _), (b, _) in zip(steps, steps[1:]):
            if a == b:
                raise ValueError(f"{flag}: two thresholds fall on sample {a} (thresholds count tokens, "
                                 f"--seq-length {seq_length} to a sample)")
        if any(batch < 1 for _, batch in steps):
            raise ValueError(f"{flag}: batch sizes must be positive")
        final = steps[-1][1]
        if global_batch_size is not None and global_batch_size != final:
            raise ValueError(f"--global-batch-size {global_batch_size} and {flag} disagree: the schedule ends at "
                             f"{final}; drop --global-batch-size or make it {final}")
        return cls(final=final, steps=tuple(steps), flag=flag)

    # -- the schedule ---------------------------------------------------------------
    def at(self, consumed_samples: int) -> int:
        """The global batch of the iteration that starts after ``consumed_samples`` samples."""
        if self.rampup is not None:  # megatron-core's RampupBatchsizeNumMicroBatchesCalculator.update
            start, increment, samples = self.rampup
            if consumed_samples > samples:
                return self.final
            per_increment = samples / ((self.final - start) // increment)
            return start + int(consumed_samples / per_increment) * increment
        batch = self.final
        for threshold, size in self.steps:
            if consumed_samples < threshold:
                break
            batch = size
        return batch

    def batches(self) -> Tuple[Tuple[int, int], ...]:
        """(first consumed-sample count, batch) of every batch size the schedule takes, in order."""
        if self.rampup is None:
            return self.steps or ((0, self.final),)
        start, increment, samples = self.rampup
        n = (self.final - start) // increment
        per_increment = samples / n
        out = []
        for k in range(n + 1):  # the first count c where at(c) reaches the k-th size (float rounding fixed up)
            size, first = start + k * increment, math.ceil(k * per_increment)
            while first > 0 and self.at(first - 1) >= size:
                first -= 1
            while self.at(first) < size:
                first += 1
            if self.at(first) == size:  # a short ramp-up may step over some sizes
                out.append((first, size))
        return tuple(out)

    def samples_in(self, iterations: int) -> int:
        """Samples consumed by ``iterations`` iterations from the start."""
        consumed = 0
        for _ in range(iterations):
            consumed += self.at(consumed)
        return consumed

    def iterations_for_samples(self, train_samples: int) -> int:
        """Megatron-LM's ``update_train_iters``: its step-schedule rule (iterate until the samples are
        reached) for a step schedule; its ramp-up rule (through the ramp-up, then whole final
        batches; a partial last batch is dropped) for --rampup-batch-size."""
        iterations = consumed = 0
        if self.rampup is not None:
            while consumed <= self.rampup[2] and consumed <= train_samples:
                consumed += self.at(consumed)
                iterations += 1
            if train_samples > consumed:
                iterations += (train_samples - consumed) // self.final
            return iterations
        return self.iterations_to_reach(train_samples)

    def iterations_to_reach(self, samples: int) -> int:
        """Iterations until at least ``samples`` samples are consumed."""
        iterations = consumed = 0
        while consumed < samples:
            consumed += self.at(consumed)
            iterations += 1
        return iterations

    def indivisible(self, micro_times_dp: int, from_samples: int = 0) -> Optional[str]:
        """The refusal when a batch reached from ``from_samples`` on does not split into micro
        batches of every data-parallel rank (None when all do)."""
        sizes = self.batches()
        for i, (first, size) in enumerate(sizes):
            last_use = sizes[i + 1][0] if i + 1 < len(sizes) else None
            if (last_use is None or last_use > from_samples) and size % micro_times_dp:
                return (f"{self.flag}: its batch of {size} (from {first} samples consumed) is not divisible by "
                        f"--micro-batch-size x data-parallel size = {micro_times_dp}; every batch of the "
                        f"schedule must be a multiple of {micro_times_dp}")
        return None

    def describe(self) -> str:
        """One line for --dry-run and the start of the run."""
        shown = self.batches()
        text = ", ".join(f"{size} from {first}" for first, size in shown[:8])
        more = f", ... ({len(shown)} sizes)" if len(shown) > 8 else ""
        return f"global batch {text}{more} samples consumed ({self.flag})"
