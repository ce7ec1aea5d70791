"""Fault injection in a save, on 2 gloo processes: a full disk on one rank (while writing its
files, or rank 0 while publishing) stops every rank with one message that says so, removes the
partial checkpoint and leaves the previous checkpoint and the "latest" pointer as they were."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from fpdt_ext.testing.spawn import run_world


pytestmark = pytest.mark.fault  # the fault-injection tier (pytest -m fault)


def _save_twice(rank, world, save_dir, fail_rank, phase):
    from megatron.core.dist_checkpointing import ShardedTensor

    from fpdt_ext.mcore import cpu_shims
    from megatron.training import checkpointing

    cpu_shims.prepare()  # what a training run's initialize() does first

    def state(value):
        local = torch.full((4,), float(value + rank))
        return {"w": ShardedTensor.from_rank_offsets("w", local, (0, rank, world))}

    checkpointing.write_checkpoint(save_dir, 1, state(1), {f"train_state/rank_{rank:05d}.pt": {"r": rank}})
    if rank == fail_rank:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if phase == "files":
            torch.save = full
        else:
            checkpointing._write_synced = full
    try:
        checkpointing.write_checkpoint(save_dir, 2, state(2), {f"train_state/rank_{rank:05d}.pt": {"r": rank}})
    except checkpointing.CheckpointError as e:
        return str(e)
    return None


@pytest.mark.parametrize("fail_rank,phase", [(1, "files"), (0, "publish")])
def test_a_full_disk_stops_every_rank_saying_so_and_keeps_the_previous_checkpoint(tmp_path, fail_rank, phase):
    save_dir = str(tmp_path / "ckpt")
    messages = run_world(2, _save_twice, save_dir, fail_rank, phase, timeout=300)
    for message in messages:
        assert message is not None and "no space left on the device of --save" in message, messages
        assert "iteration 2 was not written" in message and "previous checkpoint (iteration 1) is intact" in message
    assert sorted(os.listdir(save_dir)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")).read() == "1"
