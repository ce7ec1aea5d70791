"""The benchmark scripts' arithmetic and helpers (their end-to-end runs: tests/test_gpu_check.py's dry run)."""

import pytest

from bench.max_seq import fit_line, max_length, segment_slope_spread


def test_line_fit_and_maximum_under_a_cap():
    points = [(1024, 100 + 2 * 1024), (2048, 100 + 2 * 2048), (4096, 100 + 2 * 4096), (8192, 100 + 2 * 8192)]
    intercept, slope, deviation = fit_line(points)
    assert intercept == pytest.approx(100) and slope == pytest.approx(2) and deviation < 1e-12
    assert max_length(intercept, slope, 100 + 2 * 10000, 1024) == 9216
    _, _, bent = fit_line([(1, 1), (2, 2), (3, 3), (4, 8)])
    assert bent > 0.05
    assert segment_slope_spread(points) == pytest.approx(1)


def test_a_bend_that_the_line_fit_hides_is_caught():
    """FPDT on llama-tiny at 12K-24K (MiB): the first two points are on the loss-backward
    line, the last two on the steeper layer-backward one; the fit is within 0.8%."""
    points = [(12288, 441.1), (16384, 458.6), (20480, 484.5), (24576, 514.4)]
    assert fit_line(points)[2] < 0.01
    assert segment_slope_spread(points) > 1.5


def test_tensor_census_finds_the_peak_and_forgets_freed_tensors():
    import torch

    from bench.memory_census import TensorCensus

    census = TensorCensus()
    with census:
        a = torch.ones(1 << 18)  # 1 MiB
        b = torch.ones(1 << 19)  # 2 MiB: the peak, 3 MiB, is here
        view = b[: 1 << 10]  # a view: no new memory
        b.mul_(2)  # in place: no new memory
        del a
        c = torch.ones(1 << 18)
    report = census.report()["forward"]
    assert report["peak_bytes"] == 3 << 20
    assert census.total == 3 << 20  # b and c live; a was dropped when freed
    assert sum(n for _, n in report["by_site"]) == 3 << 20
    del b, c, view
