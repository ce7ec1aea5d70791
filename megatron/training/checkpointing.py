"""Saving checkpoints: megatron-core distributed checkpoints, written atomically.

Layout (Megatron-LM's names)::

    SAVE/latest_checkpointed_iteration.txt      the iteration of the newest complete checkpoint
    SAVE/iter_0000100/                          megatron-core dist_checkpointing of the model
    SAVE/iter_0000100/train_state/rank_00000.pt optimizer, scheduler, RNG and data position of each rank

Every checkpoint is written into ``iter_XXXXXXX.tmp-<nonce>`` and renamed to its
final name by rank 0 after all ranks finished; the "latest" file moves only
after that rename (write to a temporary file, then ``os.replace``). A crash at
any point leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import shutil
import time

import torch
import torch.distributed as dist

LATEST = "latest_checkpointed_iteration.txt"


def checkpoint_name(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def _broadcast_str(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(trainer, iteration: int) -> str:
    """Save model, optimizer, scheduler, RNG and data position; returns the checkpoint path."""
    from megatron.core import dist_checkpointing

    args = trainer.args
    rank = dist.get_rank()
    final = checkpoint_name(args.save, iteration)
    staging = _broadcast_str(f"{final}.tmp-{int(time.time() * 1e3)}" if rank == 0 else "")
    if rank == 0:
        os.makedirs(staging, exist_ok=False)
    dist.barrier()
    dist_checkpointing.save(trainer.model.sharded_state_dict(), staging)
    os.makedirs(os.path.join(staging, "train_state"), exist_ok=True)
    torch.save(
        {
            "iteration": iteration,
            "consumed_samples": trainer.state.consumed_samples,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
            "args": vars(args).copy(),
        },
        os.path.join(staging, "train_state", f"rank_{rank:05d}.pt"),
    )
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        if os.path.exists(final):  # re-saving an iteration replaces it
            shutil.rmtree(final)
        os.replace(staging, final)
        pointer = os.path.join(args.save, LATEST)
        with open(pointer + ".tmp", "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)
    dist.barrier()
    return final
