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

Stages (docs/STAGES.md): ``--finetune`` loads --load's model weights alone and starts
at iteration 0; its checkpoints record the --load they started from, so the same
command run again resumes from --save. ``--no-load-optim`` and ``--no-load-rng``
leave out the optimizer state with the LR schedule, and the RNG states.
"""

from __future__ import annotations

import dataclasses
import errno
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
from megatron.training import megatron_fsdp

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
    directory taken. Holding it, rank 0 removes what a killed save left (``iter_*.tmp-*``, the
    pointer's temporary file): no other run can be writing them. Collective: every rank raises :class:`CheckpointError` if the directory is
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
                    _remove_partial_saves(save_dir)
        problem = _broadcast_object(problem)
        if problem:
            raise CheckpointError(problem)


_STAGING = re.compile(r"^iter_\d{7}\.tmp-\d+$")


def _remove_partial_saves(save_dir: str) -> None:
    names = [n for n in os.listdir(save_dir) if _STAGING.match(n) or n == LATEST + ".tmp"]
    for name in names:
        path = os.path.join(save_dir, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    if names:
        print(f" removed what an interrupted save left in {save_dir}: {', '.join(sorted(names))}", flush=True)


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
    layout = {"world_size": par.world_size, "tensor_model_parallel_size": par.tensor_model_parallel_size,
              "fpdt_parallel_size": par.fpdt_parallel_size, "data_parallel_size": par.data_parallel_size}
    if par.pipeline_model_parallel_size > 1:  # (absent without a pipeline: as checkpoints before it)
        layout.update(pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                      model_chunks=par.model_chunks, stage_layers=par.stage_layers(trainer.config.model.num_layers))
    return layout


# How megatron-core's optimizers lay out their state in a checkpoint (the GPU path; HostAdamW's
# layout is always resharding-safe). "fully_reshardable": the distributed optimizer's state is
# saved per parameter, so a checkpoint loads at another TP / FPDT / DP layout, as the model does
# (megatron-core's default, "fully_sharded_model_space", is refused by its own checkpointing).
SHARDED_STATE_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


MEGATRON_OPTIMIZER = "megatron-core's optimizer"


def optimizer_format(optimizer) -> str:
    """Whose layout the optimizer state is saved in: HostAdamW's (the CPU path, and Megatron-FSDP's
    on GPU) or megatron-core's."""
    return getattr(optimizer, "state_layout", MEGATRON_OPTIMIZER)


def model_sharded_state(trainer) -> dict:
    """The model's sharded state: the GPTModel's own names (not DDP's "module."); with virtual
    pipeline stages every chunk's under "chunk<i>." in one dict. The saved tensors are keyed by
    global layer numbers (megatron-core's offsets), so a checkpoint loads at any pipeline size."""
    if megatron_fsdp.is_wrapped(trainer.model):  # this rank's rows of each parameter (one chunk)
        return megatron_fsdp.model_sharded_state(trainer.model, trainer.groups.dp_sp)
    chunks = [m.module for m in trainer.models]
    if len(chunks) == 1:
        state = chunks[0].sharded_state_dict()
    else:
        state = {f"chunk{i}.{k}": v for i, c in enumerate(chunks) for k, v in c.sharded_state_dict().items()}
    if trainer.config.parallel.use_torch_fsdp2:  # every load and save: weights-only loads too
        from megatron.training.sharding import checkpoint_layout

        state = checkpoint_layout(state, trainer.groups.dp_sp, trainer.groups.tp)
    return state


def _load_model_state(trainer, state: dict) -> None:
    """Loaded tensors (:func:`model_sharded_state`'s layout) into the model chunks."""
    if megatron_fsdp.is_wrapped(trainer.model):
        megatron_fsdp.load_model_state(trainer.model, state)
        return
    chunks = [m.module for m in trainer.models]
    if len(chunks) == 1:
        chunks[0].load_state_dict(_model_state(trainer, chunks[0], state))
        return
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}."
        chunk.load_state_dict(_model_state(trainer, chunk, {k[len(prefix):]: v for k, v in state.items()
                                                            if k.startswith(prefix)}))


def _sharded_state(trainer, *, loading: bool, optimizer: bool = True) -> dict:
    """The training state (``optimizer=False``: without the optimizer state and the LR schedule)."""
    model_state = model_sharded_state(trainer)
    optimizer_state = {"optimizer": trainer.optimizer.sharded_state_dict(model_state, is_loading=loading,
                                                                         metadata=SHARDED_STATE_METADATA),
                       "scheduler": trainer.scheduler.state_dict()} if optimizer else {}
    return {
        "model": model_state,
        **optimizer_state,
        "iteration": trainer.state.iteration,
        "consumed_samples": trainer.state.consumed_samples,
        "valid_consumed_samples": trainer.valid_data.consumed_samples,  # validation continues, not restarts
        "layout": _layout(trainer),
        "kind": "training",
        "model_args": model_args_dict(trainer.config),
        "true_vocab_size": trainer.tokenizer.vocab_size,
        "padded_vocab_size": trainer.padded_vocab_size,
        "optimizer_format": optimizer_format(trainer.optimizer),
        "lr_schedule_unit": trainer.config.lr_schedule.unit,  # samples with a batch ramp-up
        "finetuned_from": trainer.state.finetuned_from,  # the stage's --load, which a restart must not redo
    }


# -- save ------------------------------------------------------------------------------


def _disk_full(error: Optional[BaseException]) -> bool:
    """Whether ``error`` (or what caused it, or a writer failure it gathers) is ENOSPC."""
    if error is None:
        return False
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
        return True
    gathered = getattr(error, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(gathered, dict) and any(_disk_full(f[0] if isinstance(f, tuple) else f) for f in gathered.values()):
        return True
    return _disk_full(error.__cause__ or error.__context__)


def _agree(error: Optional[BaseException], save_dir: str, iteration: int, staging: str) -> None:
    """Collective: if any rank failed a step of the save, every rank raises CheckpointError (saying
    so when the disk is full) after rank 0 removed the partial checkpoint; else nothing."""
    mine = None
    if error is not None:
        gathered = getattr(error, "failures", None)
        if isinstance(gathered, dict) and gathered:  # what a megatron-core writer raised, not the wrapper
            first = next(iter(gathered.values()))
            error = first[0] if isinstance(first, tuple) else first
        lines = str(error).strip().splitlines()
        mine = ("full" if _disk_full(error) else "other", f"{type(error).__name__}: {lines[0] if lines else ''}")
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, mine)
    failures = [f for f in failures if f is not None]
    if not failures:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    previous = _latest_pointer(save_dir)
    kept = (f"the previous checkpoint (iteration {previous}) is intact" if previous is not None
            else "no earlier checkpoint exists")
    if any(kind == "full" for kind, _ in failures):
        free = shutil.disk_usage(save_dir).free / 2**30
        raise CheckpointError(f"no space left on the device of --save {save_dir} ({free:.2f} GiB free): the "
                              f"checkpoint of iteration {iteration} was not written and its partial files are "
                              f"removed; {kept}. Free space there or give another --save, then resume with --load")
    raise CheckpointError(f"saving iteration {iteration} into {save_dir} failed ({failures[0][1]}); {kept}")


def write_checkpoint(save_dir: str, iteration: int, sharded_state: dict, rank_files: dict,
                     keep_last: Optional[int] = None) -> str:
    """Write one checkpoint atomically (collective): megatron-core dist_checkpointing of
    ``sharded_state``, then each rank's ``rank_files`` ({relative path: object} for torch.save),
    then the manifest, the rename and the "latest" pointer. A failure on any rank (a full disk)
    raises CheckpointError on every rank and leaves the previous checkpoint and pointer as they were."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    rank = dist.get_rank()
    final = checkpoint_name(save_dir, iteration)
    staging = _broadcast_object(f"{final}.tmp-{int(time.time() * 1e6)}" if rank == 0 else None)
    error = None
    try:
        if rank == 0:
            os.makedirs(staging)
    except OSError as e:
        error = e
    _agree(error, save_dir, iteration, staging)
    try:
        dist_checkpointing.save(sharded_state, staging)
        for relative, obj in rank_files.items():
            os.makedirs(os.path.dirname(os.path.join(staging, relative)), exist_ok=True)
            torch.save(obj, os.path.join(staging, relative))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
        error = e
    _agree(error, save_dir, iteration, staging)  # every rank's files are on disk
    names = _broadcast_object(_files(staging) if rank == 0 else None)
    manifest = {"iteration": iteration, "files": _hash_spread(staging, names)}
    try:
        if rank == 0:
            _publish(save_dir, iteration, staging, manifest)
    except OSError as e:
        error = e
    _agree(error, save_dir, iteration, staging)
    if rank == 0 and keep_last:
        for old in list_checkpoints(save_dir)[keep_last:]:
            shutil.rmtree(checkpoint_name(save_dir, old), ignore_errors=True)
    dist.barrier()
    return final


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _publish(save_dir: str, iteration: int, staging: str, manifest: dict) -> None:
    """Rank 0: the manifest, the rename to the final name, then the "latest" pointer."""
    final = checkpoint_name(save_dir, iteration)
    _write_synced(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1))
    if os.path.exists(final):  # re-saving an iteration replaces it
        shutil.rmtree(final)
    os.replace(staging, final)
    # the pointer never moves backwards: an older iteration written later (a conversion re-run
    # into a run directory) must not make the next run resume before the newer checkpoints
    current = _latest_pointer(save_dir)
    if current is None or iteration >= current:
        pointer = os.path.join(save_dir, LATEST)
        _write_synced(pointer + ".tmp", str(iteration))
        os.replace(pointer + ".tmp", pointer)


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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problem = f"{MANIFEST} is unreadable ({e})"
        else:
            files = manifest.get("files") if isinstance(manifest, dict) else None
            if not isinstance(files, dict) or not all(
                    isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
                    for v in files.values()):
                problem = f"{MANIFEST} is malformed (no list of files with sizes and hashes)"
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


def find_checkpoint(directory: str) -> Optional[Tuple[str, dict]]:
    """(path, common state) of the newest usable checkpoint in ``directory``, or None if there is
    none at all. Raises CheckpointError when checkpoints exist but none is usable (collective)."""
    from megatron.core import dist_checkpointing

    path, reasons = newest_usable_checkpoint(directory)
    if path is None:
        if reasons:
            raise CheckpointError(f"no usable checkpoint in {directory}:\n  " + "\n  ".join(reasons))
        return None
    return path, dist_checkpointing.load_common_state_dict(path)


@dataclasses.dataclass(frozen=True)
class Start:
    """The checkpoint a run starts from: ``path`` and its common state, loaded whole (a resume) or,
    with ``finetune``, for its model weights only."""

    path: str
    common: dict
    finetune: bool = False


def checkpoint_to_start_from(ckpt) -> Optional[Start]:
    """Where a run with the checkpoint config ``ckpt`` starts (None: from scratch), said on rank 0
    (collective). Without --finetune: the newest usable checkpoint in --load. With it: the stage's
    own newest checkpoint in --save when there is one, so a restarted job (the same command again)
    resumes the stage instead of starting it over from --load; else --load's, for its weights. A
    --save holding checkpoints of another run is refused (CheckpointError): the stage's iterations
    restart at 0, and a resume would pick the other run's newer ones."""
    if not ckpt.load:
        return None
    if ckpt.finetune:
        origin = os.path.realpath(ckpt.load)
        own = find_checkpoint(ckpt.save) if ckpt.save else None
        if own is not None:
            path, common = own
            if common.get("finetuned_from") != origin:
                raise CheckpointError(
                    f"--save {ckpt.save} already holds {path}, which is not from a run finetuned from --load "
                    f"{ckpt.load}: give this stage an empty --save directory (or, to resume that run, drop "
                    f"--finetune and --load {ckpt.save})")
            _print0(f" --save {ckpt.save} holds this stage's checkpoints: resuming from them (--finetune from "
                    f"--load {ckpt.load} applies to the stage's first start only)")
            return Start(path, common)
        found = find_checkpoint(ckpt.load)
        if found is None:
            raise CheckpointError(f"--finetune: no checkpoint in --load {ckpt.load} to start from")
        return Start(*found, finetune=True)
    found = find_checkpoint(ckpt.load)
    return Start(*found) if found is not None else None


def saved_padded_vocab(common: dict) -> int:
    """The number of embedding / output rows a checkpoint holds (stored since it varies with TP;
    derived from the saving run's layout for checkpoints written before it was stored)."""
    from megatron.training.models import padded_vocab_size

    if "padded_vocab_size" in common:
        return common["padded_vocab_size"]
    args = common["model_args"]
    tp = common.get("layout", {}).get("tensor_model_parallel_size", 1)
    return padded_vocab_size(common.get("true_vocab_size") or args["vocab_size"], args["make_vocab_size_divisible_by"],
                             tp)


# Model fields that give parameters their shapes: a checkpoint with other values cannot be loaded.
_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "ffn_hidden_size", "swiglu", "normalization", "add_bias_linear", "qk_layernorm",
                 "untie_embeddings_and_output_weights")
# Fields that change what the loaded weights compute without changing a shape: allowed (a new
# training stage may change them on purpose) and said. The position embedding type is one between
# rope and yarn; learned positions have a weight of their own.
_MATH_FIELDS = ("position_embedding_type", "rotary_base", "rotary_percent", "rotary_seq_len_interpolation_factor",
                "use_rope_scaling", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings",
                "rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
                "mscale", "mscale_all_dim", "yarn_correction_range_round_to_int", "norm_epsilon", "openai_gelu")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_for_checkpoint(common: dict, path: str, model, true_vocab: int, tp: int) -> int:
    """Check that the checkpoint at ``path`` (its common state) fits the model ``model``
    (:class:`~megatron.training.config.ModelConfig`) with a tokenizer of ``true_vocab`` tokens at
    TP ``tp``; returns the padded vocabulary to build with: the checkpoint's own, so that loading is
    exact whatever TP size saved it (megatron-core would load a differently padded embedding with
    zero or dropped rows, which enter the softmax). Raises CheckpointError saying what differs."""
    saved = model_config_from_args(common["model_args"])
    differ = [f"{_flag(f)} {getattr(saved, f)} (this run: {getattr(model, f)})" for f in _SHAPE_FIELDS
              if getattr(saved, f) != getattr(model, f)]
    if saved.rotary != model.rotary:  # learned positions against RoPE or YaRN
        differ.append(f"--position-embedding-type {saved.position_embedding_type} (this run: "
                      f"{model.position_embedding_type})")
    if saved.position_embedding_type == "learned_absolute" == model.position_embedding_type and \
            saved.max_position_embeddings != model.max_position_embeddings:
        differ.append(f"--max-position-embeddings {saved.max_position_embeddings} (this run: "
                      f"{model.max_position_embeddings})")
    if saved.apply_layernorm_1p != model.apply_layernorm_1p:  # same shapes, norm weights 1 apart
        differ.append(f"--apply-layernorm-1p {saved.apply_layernorm_1p} (this run: {model.apply_layernorm_1p}; "
                      f"its norm weights differ from this run's by exactly 1: to convert, export it with "
                      f"tools/checkpoint/convert.py --saver hf and import that with --loader hf"
                      f"{'' if saved.apply_layernorm_1p else ' --apply-layernorm-1p'})")
    saved_vocab = common.get("true_vocab_size") or common["model_args"].get("vocab_size")
    if saved_vocab is not None and saved_vocab != true_vocab:
        differ.append(f"a vocabulary of {saved_vocab} tokens (this run's tokenizer: {true_vocab})")
    if differ:
        raise CheckpointError(f"{path} holds another model: it was saved with " + ", ".join(differ)
                              + "; give the flags it was trained with, or another --load")
    padded = saved_padded_vocab(common)
    if padded % tp:
        raise CheckpointError(f"{path} has {padded} vocabulary rows (padded for its TP size), which TP {tp} does "
                              f"not divide; use a --tensor-model-parallel-size that divides {padded}")
    for f in _MATH_FIELDS:
        if getattr(saved, f) != getattr(model, f):
            _print0(f" note: {path} was trained with {_flag(f)} {getattr(saved, f)}; this run uses "
                    f"{getattr(model, f)}")
    return padded


def load_checkpoint(trainer, start: Start) -> int:
    """Load the checkpoint ``start`` (:func:`checkpoint_to_start_from`) into the trainer, whose model
    was built for it (:func:`model_for_checkpoint`); returns the iteration training continues from.
    A weights-only checkpoint (converted or exported) and --finetune load the model alone: the
    run starts at iteration 0 with its own fresh optimizer, LR schedule, data position and RNG
    streams (those --seed gave it). --no-load-optim leaves out the optimizer state and the LR
    schedule (Megatron-LM's), --no-load-rng the RNG states (re-seeded from --seed and the iteration)."""
    from megatron.core import dist_checkpointing

    from megatron.training.optimizer import prepare_for_loading

    path, common, ckpt = start.path, start.common, trainer.config.checkpoint
    iteration = int(_ITER_DIR.match(os.path.basename(path)).group(1))
    if common.get("kind") == "weights" or start.finetune:
        state = dist_checkpointing.load({"model": model_sharded_state(trainer)}, path)
        _load_model_state(trainer, state["model"])
        trainer.optimizer.reload_model_params()  # fp32 master weights were made from the initial ones
        if start.finetune:
            trainer.state.finetuned_from = os.path.realpath(ckpt.load)
            _print0(f" finetuning from {path} (iteration {iteration}): its model weights only; starting at "
                    f"iteration 0 with a fresh optimizer, LR schedule, data position and RNG streams")
        else:
            _print0(f" loaded model weights from {path} (no optimizer or training state: starting at iteration 0)")
        return 0
    load_optim = not ckpt.no_load_optim
    saved_format, this_format = common.get("optimizer_format"), optimizer_format(trainer.optimizer)
    if load_optim and saved_format is not None and saved_format != this_format:
        raise CheckpointError(
            f"{path} holds optimizer state written by {saved_format}, and this run uses {this_format} "
            f"({'GPU' if this_format == MEGATRON_OPTIMIZER else 'CPU'} path): resume it on the kind of machine "
            "that wrote it, pass --no-load-optim (a fresh optimizer and LR schedule; the iteration and data "
            "continue), or start from its weights alone with --finetune (a new stage)")
    saved_unit, this_unit = common.get("lr_schedule_unit", "iterations"), trainer.config.lr_schedule.unit
    if load_optim and saved_unit != this_unit:
        raise CheckpointError(
            f"{path}'s LR schedule counts {saved_unit} and this run's counts {this_unit} (the scheduler counts "
            f"samples with --rampup-batch-size or --step-batch-size-schedule, as Megatron-LM's): resume "
            f"{'with' if saved_unit == 'samples' else 'without'} a batch ramp-up, pass --no-load-optim (a fresh "
            f"optimizer and LR schedule; the iteration and data continue), or start a new stage from its weights "
            f"with --finetune")
    if load_optim:
        prepare_for_loading(trainer.optimizer)
    state = dist_checkpointing.load(_sharded_state(trainer, loading=True, optimizer=load_optim), path)
    _load_model_state(trainer, state["model"])
    if load_optim:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
    else:
        trainer.optimizer.reload_model_params()
        _print0(" --no-load-optim: the optimizer state and the LR schedule start afresh (warmup and decay from "
                "step 0)")
    trainer.state.iteration = state["iteration"]
    trainer.state.consumed_samples = state["consumed_samples"]
    trainer.state.finetuned_from = common.get("finetuned_from")
    trainer.train_data.consumed_samples = state["consumed_samples"]
    trainer.valid_data.consumed_samples = state.get("valid_consumed_samples", 0)
    rng_file = os.path.join(path, "train_state", f"rank_{dist.get_rank():05d}.pt")
    if not ckpt.no_load_rng and state["layout"] == _layout(trainer) and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        from megatron.training.initialize import set_seed

        why = ("--no-load-rng" if ckpt.no_load_rng else
               f"checkpoint layout {state['layout']} differs from this run's {_layout(trainer)}")
        _print0(f" note: {why}; RNG streams re-seeded from --seed and the iteration")
        set_seed(trainer.config.training.seed + iteration, tp_rank=trainer.groups.tp_rank,
                 pp_rank=trainer.groups.pp_rank)
    _print0(f" loaded checkpoint {path} (iteration {iteration}, {state['consumed_samples']} samples consumed)")
    return iteration


def _model_state(trainer, chunk, state: dict) -> dict:
    """``state`` (a model chunk's loaded state), with --use-torch-fsdp2 this rank's shards of the
    sharded parameters made DTensors laid out as the chunk's; unchanged otherwise."""
    if not trainer.config.parallel.use_torch_fsdp2:
        return state
    from megatron.training.sharding import is_sharded, like

    current = chunk.state_dict()
    return {k: like(current[k], v) if is_sharded(current.get(k)) and not is_sharded(v) else v
            for k, v in state.items()}


def _print0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)
