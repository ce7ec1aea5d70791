"""fpdt_ext.testing.spawn.run_world: results by rank, errors reported, dead workers noticed at once."""

import os
import time

import pytest

from fpdt_ext.testing.spawn import run_world


def rank_worker(rank, world_size, scale):
    return rank * scale


def raising_worker(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 says no")
    return rank


def dying_worker(rank, world_size):
    if rank == 1:
        os._exit(3)  # dies without reporting, as a killed or crashed process would
    time.sleep(60)
    return rank


def test_values_come_back_by_rank():
    assert run_world(2, rank_worker, 10) == [0, 10]


def test_an_exception_is_reported_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 says no"):
        run_world(2, raising_worker, timeout=120)


def test_a_worker_that_dies_without_reporting_fails_fast():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] exited \(exit codes \[3\]\)"):
        run_world(2, dying_worker, timeout=600)
    assert time.monotonic() - start < 45  # not the 600 s timeout, nor rank 0's 60 s sleep
