"""The benchmark scripts: their arithmetic (fast) and an end-to-end smoke run of the GPU sweep (slow)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.max_seq import fit_line, max_length  # noqa: E402


def test_line_fit_and_maximum_under_a_cap():
    points = [(1024, 100 + 2 * 1024), (2048, 100 + 2 * 2048), (4096, 100 + 2 * 4096), (8192, 100 + 2 * 8192)]
    intercept, slope, deviation = fit_line(points)
    assert intercept == pytest.approx(100) and slope == pytest.approx(2) and deviation < 1e-12
    assert max_length(intercept, slope, 100 + 2 * 10000, 1024) == 9216
    _, _, bent = fit_line([(1, 1), (2, 2), (3, 3), (4, 8)])
    assert bent > 0.05


@pytest.mark.slow
def test_gpu_sweep_runs_end_to_end_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_sweep.py", "--model", "llama-tiny", "--start", "512",
                           "--chunk-size", "256", "--budget-s", "60", "--max-seq", "1024",
                           "--out", str(tmp_path / "sweep.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    summary = json.loads((tmp_path / "sweep.json").read_text())
    kinds = {(r["kind"], r["seq"]) for r in summary["rows"]}
    assert {("baseline", 512), ("fpdt", 512)} <= kinds
    assert all(r["tflops"] > 0 and r["peak_bytes"] > 0 for r in summary["rows"])
    assert f"longest: baseline {summary['baseline_longest']}, FPDT {summary['fpdt_longest']}" in proc.stdout
