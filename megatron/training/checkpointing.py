"""Checkpoints: megatron-core distributed checkpoints, written atomically, verified on load.

Layout (Megatron-LM's names)::

    SAVE/latest_checkpointed_iteration.txt     the iteration of the newest complete checkpoint
    SAVE/iter_0000100/                         one checkpoint
        *.distcp, .metadata, common.pt, metadata.json   megatron-core dist_checkpointing: model,
                                                        optimizer (sharded like the parameters),
                                                        scheduler, iteration, data position
        train_state/rank_00000.pt              RNG states of each rank
        manifest.json                          size and sha256 of every file, written last

Saving: every rank writes into ``iter_XXXXXXX.tmp-<nonce>``; after a barrier the
files are hashed (spread over the ranks), rank 0 writes the manifest, renames
the directory to its final name, then moves the "latest" pointer (temporary
file + ``os.replace``), then prunes old checkpoints (``--keep-last``). A crash
at any point leaves the previous checkpoint and pointer untouched.

Loading (``--load DIR``): checkpoints are tried newest first (starting at the
pointer); one whose manifest is missing or whose files are missing, truncated
or altered is reported with the reason and skipped for the previous one.
Model and optimizer are sharded tensors, so a checkpoint saved with one
TP / FPDT / DP layout loads into another. RNG states are restored when the
layout is the same (exact resume); otherwise ranks are re-seeded from the seed
and iteration, with a note.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from fpdt_ext import runtime

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on (no usable checkpoint, a --save directory taken or
    unwritable), with the reasons."""


LOCK = ".save.lock"


class SaveLock:
    """This run's claim on its ``--save`` directory, so that two runs never save into one.

    Rank 0 holds an exclusive POSIX record lock (``lockf``) on ``SAVE/.save.lock`` for the run's
    life (the file says which host and process holds it). Such a lock belongs to the process:
    children it forks (megatron-core's checkpoint writers) do not inherit it, and the kernel drops
    it when the process ends, however it ends, so a crashed or killed run never leaves the
    directory taken. Collective: every rank raises :class:`CheckpointError` if the directory is
    taken or cannot be written.
    """

    def __init__(self, save_dir: str):
        import fcntl
        import socket

        self._fd = None
        problem = None
        if dist.get_rank() == 0:
            path = os.path.join(save_dir, LOCK)
            try:
                os.makedirs(save_dir, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                problem = f"cannot write to --save {save_dir} ({e.strerror}); give a writable directory"
            else:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    problem = (f"another run is saving into --save {save_dir} ({holder}); give this run another "
                               f"--save directory, or stop that run first")
                else:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
                    self._fd = fd
        problem = _broadcast_object(problem)
        if problem:
            raise CheckpointError(problem)


def checkpoint_name(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def _broadcast_object(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: str) -> List[str]:
    out = []
    for directory, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(directory, n), root) for n in names if n != MANIFEST]
    return sorted(out)


def _hash_spread(root: str, names: List[str]) -> dict:
    """{name: [size, sha256]} for every file, each rank hashing every world-th file."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: [os.path.getsize(os.path.join(root, n)), _sha256(os.path.join(root, n))]
            for n in names[rank::world] if os.path.exists(os.path.join(root, n))}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


# -- state ---------------------------------------------------------------------------


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "cuda": runtime.current().device_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    runtime.current().set_device_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout(trainer) -> dict:
    par = trainer.config.parallel
    return {"world_size": par.world_size, "tensor_model_parallel_size": par.tensor_model_parallel_size,
            "fpdt_parallel_size": par.fpdt_parallel_size, "data_parallel_size": par.data_parallel_size}


# How megatron-core's optimizers lay out their state in a checkpoint (the GPU path; HostAdamW's
# layout is always resharding-safe). "fully_reshardable": the distributed optimizer's state is
# saved per parameter, so a checkpoint loads at another TP / FPDT / DP layout, as the model does
# (megatron-core's default, "fully_sharded_model_space", is refused by its own checkpointing).
SHARDED_STATE_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


MEGATRON_OPTIMIZER = "megatron-core's optimizer"


def optimizer_format(optimizer) -> str:
    """Whose layout the optimizer state is saved in: HostAdamW's (the CPU path) or megatron-core's."""
    from megatron.training.optimizer import HostAdamW

    return "HostAdamW" if isinstance(optimizer, HostAdamW) else MEGATRON_OPTIMIZER


def _sharded_state(trainer, *, loading: bool) -> dict:
    model_state = trainer.model.module.sharded_state_dict()  # the GPTModel's own names, not DDP's "module."
    return {
        "model": model_state,
        "optimizer": trainer.optimizer.sharded_state_dict(model_state, is_loading=loading,
                                                          metadata=SHARDED_STATE_METADATA),
        "scheduler": trainer.scheduler.state_dict(),
        "iteration": trainer.state.iteration,
        "consumed_samples": trainer.state.consumed_samples,
        "valid_consumed_samples": trainer.valid_data.consumed_samples,  # validation continues, not restarts
        "layout": _layout(trainer),
        "kind": "training",
        "model_args": model_args_dict(trainer.config),
        "true_vocab_size": trainer.tokenizer.vocab_size,
        "optimizer_format": optimizer_format(trainer.optimizer),
    }


# -- save ------------------------------------------------------------------------------


def write_checkpoint(save_dir: str, iteration: int, sharded_state: dict, rank_files: dict,
                     keep_last: Optional[int] = None) -> str:
    """Write one checkpoint atomically (collective): megatron-core dist_checkpointing of
    ``sharded_state``, then each rank's ``rank_files`` ({relative path: object} for torch.save),
    then the manifest, the rename and the "latest" pointer."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = checkpoint_name(save_dir, iteration)
    staging = _broadcast_object(f"{final}.tmp-{int(time.time() * 1e6)}" if rank == 0 else None)
    if rank == 0:
        os.makedirs(staging)
    dist.barrier()
    dist_checkpointing.save(sharded_state, staging)
    for relative, obj in rank_files.items():
        os.makedirs(os.path.dirname(os.path.join(staging, relative)), exist_ok=True)
        torch.save(obj, os.path.join(staging, relative))
    dist.barrier()  # every rank's files are on disk
    names = _broadcast_object(_files(staging) if rank == 0 else None)
    manifest = {"iteration": iteration, "files": _hash_spread(staging, names)}
    if rank == 0:
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # re-saving an iteration replaces it
            shutil.rmtree(final)
        os.replace(staging, final)
        # the pointer never moves backwards: an older iteration written later (a conversion re-run
        # into a run directory) must not make the next run resume before the newer checkpoints
        current = _latest_pointer(save_dir)
        if current is None or iteration >= current:
            pointer = os.path.join(save_dir, LATEST)
            with open(pointer + ".tmp", "w") as f:
                f.write(str(iteration))
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer + ".tmp", pointer)
        if keep_last:
            for old in list_checkpoints(save_dir)[keep_last:]:
                shutil.rmtree(checkpoint_name(save_dir, old), ignore_errors=True)
    dist.barrier()
    return final


def save_checkpoint(trainer, iteration: int) -> str:
    """Save everything needed to continue exactly; returns the checkpoint path."""
    rank = dist.get_rank()
    ckpt = trainer.config.checkpoint
    return write_checkpoint(ckpt.save, iteration, _sharded_state(trainer, loading=False),
                            {f"train_state/rank_{rank:05d}.pt": _rng_state()}, keep_last=ckpt.keep_last)


def model_args_dict(config) -> dict:
    """The model of the run ``config``, stored in every checkpoint as a flat dict under the flags'
    names (what converters and evaluation rebuild it from: :func:`model_config_from_args`)."""
    return {**dataclasses.asdict(config.model), **dataclasses.asdict(config.tokenizer),
            "group_query_attention": config.model.group_query_attention, "params_dtype": config.params_dtype,
            "seq_length": config.training.seq_length}


def model_config_from_args(saved: dict):
    """The :class:`~megatron.training.config.ModelConfig` of a checkpoint's stored model arguments."""
    from megatron.training.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in names and v is not None})


# -- load ------------------------------------------------------------------------------


def list_checkpoints(directory: str) -> List[int]:
    """Iterations of the published checkpoints in ``directory``, newest first."""
    if not os.path.isdir(directory):
        return []
    found = [int(m.group(1)) for name in os.listdir(directory) if (m := _ITER_DIR.match(name))]
    return sorted(found, reverse=True)


def _latest_pointer(directory: str) -> Optional[int]:
    try:
        with open(os.path.join(directory, LATEST)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def verify_checkpoint(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` is unusable, or None (collective: all ranks take part)."""
    problem = None
    manifest = None
    if dist.get_rank() == 0:
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            problem = f"{MANIFEST} is missing (the save did not finish)"
        except json.JSONDecodeError as e:
            problem = f"{MANIFEST} is unreadable ({e})"
    problem, manifest = _broadcast_object((problem, manifest))
    if problem:
        return problem
    expected = manifest["files"]
    actual = _hash_spread(path, sorted(expected))
    for name, (size, digest) in sorted(expected.items()):
        if name not in actual:
            return f"{name} is missing"
        if actual[name][0] != size:
            return f"{name} has {actual[name][0]} bytes, {size} were written (truncated or altered)"
        if actual[name][1] != digest:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def newest_usable_checkpoint(directory: str) -> Tuple[Optional[str], List[str]]:
    """(path of the newest checkpoint in ``directory`` that verifies, or None; the reasons the newer
    ones were passed over). Newest means at or below the "latest" pointer (collective)."""
    candidates = list_checkpoints(directory)
    pointer = _latest_pointer(directory)
    if pointer is not None:
        candidates = [it for it in candidates if it <= pointer] or candidates
    reasons = []
    for iteration in candidates:
        path = checkpoint_name(directory, iteration)
        problem = verify_checkpoint(path)
        if problem is None:
            return path, reasons
        reasons.append(f"{path}: {problem}")
        _print0(f" checkpoint {path} is unusable: {problem}; trying the previous one")
    return None, reasons


def load_checkpoint(trainer, directory: str) -> Optional[int]:
    """Load the newest usable checkpoint in ``directory``; returns its iteration, or None if there
    is none at all. Raises CheckpointError when checkpoints exist but none is usable."""
    from megatron.core import dist_checkpointing

    from megatron.training.optimizer import prepare_for_loading

    path, reasons = newest_usable_checkpoint(directory)
    if path is None:
        if reasons:
            raise CheckpointError(f"no usable checkpoint in {directory}:\n  " + "\n  ".join(reasons))
        _print0(f" no checkpoint in {directory} yet: training starts at iteration 0")
        return None
    iteration = int(_ITER_DIR.match(os.path.basename(path)).group(1))
    common = dist_checkpointing.load_common_state_dict(path)
    kind = common.get("kind")
    if kind == "weights":  # a converted or exported model: weights only, training starts at 0
        state = dist_checkpointing.load({"model": trainer.model.module.sharded_state_dict()}, path)
        trainer.model.module.load_state_dict(state["model"])
        trainer.optimizer.reload_model_params()  # fp32 master weights were made from the initial ones
        _print0(f" loaded model weights from {path} (no optimizer or training state: starting at iteration 0)")
        return 0
    saved_format, this_format = common.get("optimizer_format"), optimizer_format(trainer.optimizer)
    if saved_format is not None and saved_format != this_format:
        raise CheckpointError(
            f"{path} holds optimizer state written by {saved_format}, and this run uses {this_format} "
            f"({'GPU' if this_format == MEGATRON_OPTIMIZER else 'CPU'} path): resume it on the kind of machine "
            "that wrote it, or start from its weights alone (tools/checkpoint/convert.py --loader mcore "
            "--saver hf, then --loader hf --saver mcore, and --load that)")
    prepare_for_loading(trainer.optimizer)
    state = dist_checkpointing.load(_sharded_state(trainer, loading=True), path)
    trainer.model.module.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.state.iteration = state["iteration"]
    trainer.state.consumed_samples = state["consumed_samples"]
    trainer.train_data.consumed_samples = state["consumed_samples"]
    trainer.valid_data.consumed_samples = state.get("valid_consumed_samples", 0)
    rng_file = os.path.join(path, "train_state", f"rank_{dist.get_rank():05d}.pt")
    if state["layout"] == _layout(trainer) and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        from megatron.training.initialize import set_seed

        _print0(f" note: checkpoint layout {state['layout']} differs from this run's {_layout(trainer)}; "
                f"RNG streams re-seeded from --seed and the iteration")
        set_seed(trainer.config.training.seed + iteration, tp_rank=trainer.groups.tp_rank)
    _print0(f" loaded checkpoint {path} (iteration {iteration}, {state['consumed_samples']} samples consumed)")
    return iteration


def _print0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)
