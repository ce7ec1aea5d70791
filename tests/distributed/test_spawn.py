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


def where_worker(rank, world_size, name):
    import sys

    return os.environ.get(name), os.getcwd(), "megatron.training.training" in sys.modules


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_rank_starts_with_the_parents_current_environment_and_directory(method, monkeypatch, tmp_path):
    """Set after the fork server started (the suite's first run starts it), an environment variable
    and a working directory reach the ranks; a forked rank has the trainer imported already, a
    spawned one not."""
    from fpdt_ext.testing import spawn

    monkeypatch.setattr(spawn, "START_METHOD", method)
    run_world(2, rank_worker, 1)  # the server (if any) starts here, before the change
    monkeypatch.setenv("FPDT_SPAWN_PROBE", "set-later")
    monkeypatch.chdir(tmp_path)
    got = run_world(2, where_worker, "FPDT_SPAWN_PROBE")
    assert [(value, cwd) for value, cwd, _ in got] == [("set-later", str(tmp_path))] * 2
    assert [preloaded for _, _, preloaded in got] == [method == "forkserver"] * 2
    # a benchmark's own choice wins: a fresh interpreter, whose resident set is its own imports'
    fresh = run_world(2, where_worker, "FPDT_SPAWN_PROBE", start_method="spawn")
    assert [preloaded for _, _, preloaded in fresh] == [False, False]
