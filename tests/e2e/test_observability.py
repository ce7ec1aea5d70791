"""TensorBoard, W&B and the profiler in a real training run, read back.

One run of pretrain_llama.py, 2 processes, FPDT with offload to a disk directory, 4
iterations with validation after 2 and 4, writes TensorBoard events (read back with
TensorBoard's EventAccumulator and compared with the --loss-log-file values and the
printed log lines), W&B offline files (when wandb is installed), and a torch profiler trace
of iteration 3 (--profile-step-start 2 --profile-step-end 3) on both ranks that holds
FPDT's named ranges. Flag errors end the run at start: one line, exit code 2.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from fpdt_ext import profiling
from tests.disk_dir import disk_scratch_dir
from tests.helpers import ROOT, TINY, run_pretrain

ITERS = TINY + ["--train-iters", "4", "--eval-iters", "1", "--eval-interval", "2"]
FPDT = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32", "--fpdt-offload", "--attention-dropout", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    pytest.importorskip("tensorboard")
    flags = [*ITERS, *FPDT, "--offload-dir", disk_scratch_dir(), "--tensorboard-dir", str(tmp / "tb"),
             "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
             "--profile", "--use-pytorch-profiler", "--profile-step-start", "2", "--profile-step-end", "3",
             "--profile-ranks", "0", "1"]
    has_wandb = _importable("wandb")
    if has_wandb:
        flags += ["--wandb-project", "fpdt-test", "--wandb-exp-name", "obs", "--wandb-save-dir", str(tmp / "wandb")]
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # no network; inherited by the run
    rows, out = run_pretrain(tmp, "obs", 2, flags, timeout=300)
    return dict(tmp=tmp, rows=rows, out=out, has_wandb=has_wandb)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_match_the_log(run):
    rows, out = run["rows"], run["out"]
    assert len(glob.glob(str(run["tmp"] / "tb" / "events.out.tfevents.*"))) == 1  # the last rank's writer only
    tb = _scalars(run["tmp"] / "tb")
    logged = [r for r in rows if "lm_loss" in r]
    assert [r["iteration"] for r in logged] == [1, 2, 3, 4]
    printed = {int(m[0]): m[1:] for m in re.findall(
        r"iteration +(\d+)/ +4 \|.*?learning rate: (\S+) \|.*?lm loss: (\S+) \| grad norm: (\S+) \|", out)}
    for r in logged:
        it = r["iteration"]
        # TensorBoard holds float32
        assert tb["lm loss"][it] == pytest.approx(r["lm_loss"], rel=1e-6)
        assert tb["learning-rate"][it] == pytest.approx(r["lr"], rel=1e-6, abs=1e-12)
        assert tb["grad-norm"][it] == pytest.approx(r["grad_norm"], rel=1e-6)
        lr, loss, grad_norm = (float(v) for v in printed[it])
        assert tb["lm loss"][it] == pytest.approx(loss, rel=2e-6)
        assert tb["learning-rate"][it] == pytest.approx(lr, rel=2e-6, abs=1e-12)
        assert tb["grad-norm"][it] == pytest.approx(grad_norm, abs=1e-3)
        assert tb["lm loss vs samples"][4 * it] == tb["lm loss"][it]  # x: consumed samples
        assert tb["batch-size"][it] == 4 and tb["loss-scale"][it] == 1.0
        for tag in ("iteration-time", "throughput", "forward-backward-time", "all-grads-sync-time", "optimizer-time",
                    "tokens-per-sec", "mem-peak-bytes", "fpdt/offload-host-bytes", "fpdt/offload-disk-peak-bytes"):
            assert tb[tag][it] >= 0, tag
        assert tb["fpdt/num-chunks"][it] == 4
    assert tb["fpdt/offload-disk-peak-bytes"][4] > 0
    validation = {r["iteration"]: r["val_loss"] for r in rows if "val_loss" in r}
    printed_val = {int(i): float(v) for i, v in re.findall(r"validation loss at iteration (\d+) \| lm loss value: "
                                                           r"(\S+) \|", out)}
    assert sorted(validation) == sorted(printed_val) == sorted(tb["lm loss validation"]) == [2, 4]
    for it, loss in validation.items():
        assert tb["lm loss validation"][it] == pytest.approx(loss, rel=1e-6)
        assert tb["lm loss validation"][it] == pytest.approx(printed_val[it], rel=2e-6)
        assert tb["lm loss validation ppl"][it] == pytest.approx(2.718281828 ** loss, rel=1e-5)
        assert tb["lm loss validation vs samples"][4 * it] == tb["lm loss validation"][it]


def test_the_profiler_trace_holds_fpdt_ranges_for_the_profiled_iteration(run):
    for rank in (0, 1):
        traces = glob.glob(str(run["tmp"] / "tb" / f"rank{rank}.*.pt.trace.json"))
        assert len(traces) == 1, traces
        with open(traces[0]) as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        assert {n for n in names if n and n.startswith("ProfilerStep#")} == {"ProfilerStep#3"}  # iteration 3 only
        # every FPDT phase this configuration runs, and the step's parts
        assert set(profiling.RANGE_NAMES) | {"forward-backward", "all-grads-sync", "optimizer"} <= names


def test_wandb_offline_files(run):
    if not run["has_wandb"]:
        pytest.skip("wandb is not installed (tests/unit/test_observability.py covers the writer with a fake module)")
    files = glob.glob(str(run["tmp"] / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    with open(files[0], "rb") as f:
        data = f.read()
    for tag in (b"lm loss", b"learning-rate", b"grad-norm", b"lm loss validation", b"iteration-time"):
        assert tag in data, tag


@pytest.mark.fault
@pytest.mark.parametrize("flags,message", [
    (["--tensorboard-dir", "TMP"], "--tensorboard-dir needs the tensorboard package, which is not installed: "
                                   "pip install tensorboard"),
    (["--profile", "--use-pytorch-profiler", "--profile-dir", "TMP", "--profile-step-start", "3",
      "--profile-step-end", "2"], "--profile-step-end 2 must be greater than --profile-step-start 3"),
])
def test_flag_errors_are_one_line_at_start(tmp_path, flags, message):
    # a tensorboard package that cannot be imported stands for one not installed
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), ROOT]))
    flags = [str(tmp_path) if f == "TMP" else f for f in flags]
    proc = subprocess.run([sys.executable, "pretrain_llama.py", *ITERS, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"pretrain_llama.py: error: {message}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
