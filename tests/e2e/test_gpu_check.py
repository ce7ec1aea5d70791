"""bench/gpu_check.sh's CPU dry run: every phase of the GPU check runs at tiny shapes and records
its results, so the script a lent GPU machine runs cannot rot while none is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_gpu_check_dry_run_runs_every_phase_and_records_results(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    ends = {r["phase"]: r for r in rows if "exit" in r}
    phases = ["env", "ceilings", "tests", "kernels", "attention", "offload", "sweep", "projection"]
    assert list(ends) == phases, list(ends)
    assert all(r["exit"] == 0 and not r["timed_out"] for r in ends.values()), ends
    by = lambda phase: [r for r in rows if r["phase"] == phase and "exit" not in r]
    assert by("env")[0]["device"] == "cpu" and by("env")[0]["megatron_core"].startswith("0.16")
    assert {r["what"] for r in by("ceilings")} == {"matmul", "copy"}
    assert all(r["tflops"] > 0 for r in by("ceilings") if r["what"] == "matmul")
    kernels = by("kernels")
    assert {r["dtype"] for r in kernels} == {"torch.float32", "torch.bfloat16"} and all(r["ok"] for r in kernels)
    assert {"out", "lse", "dq", "dk0", "dv0", "dk1", "dv1"} == set(kernels[0]["errors"])
    attention = {r["setup"]: r for r in by("attention")}
    assert attention["fpdt_vs_sdpa_bf16"]["ok"] and attention["fpdt_offload_vs_sdpa_bf16"]["ok"]
    assert all(attention[s]["fwd_bwd_ms"] > 0 for s in ("sdpa_bf16", "fpdt", "fpdt_offload"))
    assert [r["test"] for r in by("offload") if r["ok"]] == [
        "round trips under load", "sources freed while copies are in flight", "checkpointed-input offload gradients"]
    sweep = [r for r in by("sweep") if "seconds" in r]
    assert {("baseline", 1024), ("fpdt", 1024), ("baseline", 2048), ("fpdt", 2048)} <= {(r["kind"], r["seq"]) for r in sweep}
    assert all(r["tflops"] > 0 and r["peak_bytes"] > 0 and r["peak_host_bytes"] > 0 for r in sweep)
    projection = by("projection")[-1]
    assert projection["projected_longest_tokens"] > 2048 and projection["binding"] == "device"
    assert projection["projected_step_s"] > 0 and projection["planner"]["measured_slope"] > 0
