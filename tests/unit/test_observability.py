"""TensorBoard / W&B / profiling flags, the W&B writer against a fake ``wandb`` module, and the
profiling ranges (free when no profiler records, named events when one does).

The end-to-end runs (event files read back, the trace, W&B offline) are tests/e2e/test_observability.py.
"""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch

from fpdt_ext import profiling
from megatron.training import observability
from megatron.training.arguments import ArgumentError, parse_args
from megatron.training.observability import MetricWriters, ObservabilityConfig, RunObserver, StepTimers
from tests.helpers import TINY

BASE = TINY + ["--train-iters", "4"]


def _config(extra):
    return observability.observability_config(parse_args(BASE + extra))


@pytest.mark.parametrize("extra,message", [
    (["--profile", "--use-pytorch-profiler", "--profile-dir", "DIR", "--profile-step-start", "3",
      "--profile-step-end", "3"], "--profile-step-end 3 must be greater than --profile-step-start 3"),
    (["--profile", "--use-pytorch-profiler", "--profile-step-start", "-1", "--profile-step-end", "3",
      "--profile-dir", "DIR"], "--profile-step-end 3 must be greater than --profile-step-start -1 (>= 0)"),
    (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler needs a directory for its trace: give "
                                              "--tensorboard-dir or --profile-dir"),
    (["--wandb-project", "p"], "--wandb-project needs --wandb-save-dir (or --save"),
    (["--tensorboard-dir", "DIR", "--tensorboard-log-interval", "0"], "--tensorboard-log-interval must be positive"),
    (["--tensorboard-dir", "DIR", "--tensorboard-queue-size", "0"], "--tensorboard-queue-size must be positive"),
])
@pytest.mark.fault
def test_bad_flags_are_refused_with_what_to_change(extra, message, tmp_path):
    extra = [str(tmp_path) if a == "DIR" else a for a in extra]
    with pytest.raises(ArgumentError, match=re.escape(message)):
        _config(extra)


@pytest.mark.fault
def test_an_unwritable_directory_is_refused_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ArgumentError, match="--tensorboard-dir .*/file/tb: .*/file is a file, not a directory"):
        _config(["--tensorboard-dir", str(tmp_path / "file" / "tb")])


@pytest.mark.fault
@pytest.mark.skipif(torch.cuda.is_available(), reason="the Nsight Systems path is the GPU's")
def test_nsys_profiling_needs_a_gpu():
    with pytest.raises(ArgumentError, match=re.escape("needs a GPU; add --use-pytorch-profiler")):
        _config(["--profile"])


@pytest.mark.fault
def test_a_missing_package_is_named_with_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(observability, "_summary_writer_class", lambda: None)
    monkeypatch.setattr(observability, "_wandb_module", lambda: None)
    with pytest.raises(ArgumentError, match=re.escape("--tensorboard-dir needs the tensorboard package, which is "
                                                      "not installed: pip install tensorboard")):
        _config(["--tensorboard-dir", str(tmp_path)])
    with pytest.raises(ArgumentError, match=re.escape("pip install wandb")):
        _config(["--wandb-project", "p", "--wandb-save-dir", str(tmp_path)])


def test_megatron_defaults_and_the_wandb_directory_under_save(tmp_path):
    c = _config(["--wandb-project", "p", "--save", str(tmp_path)])
    assert c.wandb_save_dir == str(tmp_path / "wandb")  # Megatron-LM's default
    assert (c.tensorboard_log_interval, c.tensorboard_queue_size, c.log_loss_scale_to_tensorboard) == (1, 1000, True)
    assert (c.profile_step_start, c.profile_step_end, c.profile_ranks) == (10, 12, (0,))
    assert not _config(["--no-log-loss-scale-to-tensorboard"]).log_loss_scale_to_tensorboard


class _FakeWandb(types.ModuleType):
    """What MetricWriters uses of wandb: init() -> a run with log(dict, step=) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, data, step=None):
        self.logged.extend((step, k, v) for k, v in data.items())

    def finish(self):
        self.finished = True


def test_wandb_gets_megatron_names_on_the_last_rank(monkeypatch, tmp_path):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = ObservabilityConfig(wandb_project="proj", wandb_exp_name="run1", wandb_save_dir=str(tmp_path / "wb"),
                                 wandb_entity="team", log_validation_ppl_to_tensorboard=True)
    run_config = types.SimpleNamespace(training=types.SimpleNamespace(global_batch_size=4, offload_dir=None),
                                       fpdt=None)
    observer = RunObserver(config, run_config, timers=StepTimers(), first_iteration=0)
    assert fake.init_kwargs == dict(dir=str(tmp_path / "wb"), name="run1", project="proj", config={}, entity="team")
    observer.after_iteration(1, loss=2.5, grad_norm=0.75, lr=1e-4, loss_scale=1.0, consumed_samples=4,
                             global_batch_size=4)
    observer.at_log_interval(1, dict(ms_per_iter=100.0, tflops_per_device=1.0, tokens_per_s=512.0, mfu=None,
                                     peak_mem_gib=1.0), 1)
    observer.validation(1, 2.25, 4)
    observer.close()
    assert fake.finished
    logged = {(step, k): v for step, k, v in fake.logged}
    assert logged == {(1, "samples vs steps"): 4, (1, "learning-rate"): 1e-4, (1, "batch-size"): 4.0,
                      (1, "lm loss"): 2.5, (1, "loss-scale"): 1.0, (1, "grad-norm"): 0.75,
                      (1, "tokens-per-sec"): 512.0, (1, "mem-peak-bytes"): 2.0 ** 30,
                      (1, "lm loss validation"): 2.25}


def test_writers_only_on_the_last_rank(monkeypatch, tmp_path):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = ObservabilityConfig(wandb_project="proj", wandb_save_dir=str(tmp_path), tensorboard_dir=str(tmp_path))
    writers = MetricWriters(config, last_rank=False)
    assert not writers.active and fake.init_kwargs is None and not list(tmp_path.iterdir())


def test_ranges_are_free_without_a_profiler_and_named_with_one():
    assert profiling.phase(profiling.ALL_TO_ALL) is profiling.phase(profiling.OFFLOAD_WAIT)  # the shared no-op
    timers = StepTimers()  # disabled: start/stop open and close the range only
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with profiling.phase(profiling.ATTENTION_CHUNK_FORWARD):
            torch.ones(4).sum()
        timers.start("optimizer")
        timers.stop("optimizer")
    names = {e.name for e in prof.events()}
    assert {profiling.ATTENTION_CHUNK_FORWARD, "optimizer"} <= names
    assert timers.elapsed["optimizer"] == 0.0


def test_timers_sum_over_the_interval_and_reset():
    timers = StepTimers(enabled=True)
    for _ in range(2):
        timers.start("optimizer")
        timers.stop("optimizer")
    taken = timers.take(2)
    assert set(taken) == set(observability.TIMER_NAMES) and taken["optimizer"] > 0
    assert timers.take(1)["optimizer"] == 0.0
