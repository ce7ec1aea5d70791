"""Named ranges for FPDT's phases: in a torch profiler trace, and as NVTX ranges on CUDA.

:func:`phase` is the one helper. While a torch profiler records (``torch.profiler.profile``,
the trainer's ``--profile --use-pytorch-profiler``) it opens a ``record_function`` range;
while NVTX is switched on (:func:`set_nvtx`, the trainer's ``--profile`` without the torch
profiler, for Nsight Systems) it pushes and pops an NVTX range. Otherwise it returns a
shared no-op context: one attribute read and one call per phase, nothing allocated.

The NVTX path has not run on a GPU (this code has been tested on the CPU only); it uses
``torch.cuda.nvtx.range_push`` / ``range_pop``, which need a CUDA build of torch.

Where each range sits:

    fpdt/all_to_all                 an all-to-all issued (sequence <-> head layout, one chunk)
    fpdt/all_to_all_wait            waiting for an all-to-all to land (comm.Pending.wait)
    fpdt/attention_chunk_forward    one query chunk of the forward (its diagonal block and the
                                    KV chunks before it)
    fpdt/attention_chunk_backward   one (KV chunk, query chunk) step of the backward
    fpdt/offload                    a chunk stored (its copy to host or disk queued)
    fpdt/prefetch                   a fetch back to the device started
    fpdt/offload_wait               waiting for a fetched chunk (a disk read landing; on CUDA
                                    the compute stream is made to wait, so the host range is
                                    short and the wait shows on the GPU timeline after it)
    fpdt/loss_chunk_forward         one chunk of logits + cross entropy
    fpdt/loss_chunk_backward        one chunk of the loss's recomputed logits and gradients
    fpdt/mlp_chunk_forward          one chunk of the MLP
    fpdt/mlp_chunk_backward         one chunk of the MLP's recompute and backward
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import profiler as _torch_profiler

ALL_TO_ALL = "fpdt/all_to_all"
ALL_TO_ALL_WAIT = "fpdt/all_to_all_wait"
ATTENTION_CHUNK_FORWARD = "fpdt/attention_chunk_forward"
ATTENTION_CHUNK_BACKWARD = "fpdt/attention_chunk_backward"
OFFLOAD = "fpdt/offload"
PREFETCH = "fpdt/prefetch"
OFFLOAD_WAIT = "fpdt/offload_wait"
LOSS_CHUNK_FORWARD = "fpdt/loss_chunk_forward"
LOSS_CHUNK_BACKWARD = "fpdt/loss_chunk_backward"
MLP_CHUNK_FORWARD = "fpdt/mlp_chunk_forward"
MLP_CHUNK_BACKWARD = "fpdt/mlp_chunk_backward"

RANGE_NAMES = (ALL_TO_ALL, ALL_TO_ALL_WAIT, ATTENTION_CHUNK_FORWARD, ATTENTION_CHUNK_BACKWARD, OFFLOAD, PREFETCH,
               OFFLOAD_WAIT, LOSS_CHUNK_FORWARD, LOSS_CHUNK_BACKWARD, MLP_CHUNK_FORWARD, MLP_CHUNK_BACKWARD)

_NULL = contextlib.nullcontext()
_nvtx = False  # switched by the trainer's profiler window (Nsight Systems), never in a hot path


def set_nvtx(on: bool) -> None:
    """Emit NVTX ranges from :func:`phase` (needs CUDA) until switched off."""
    global _nvtx
    _nvtx = bool(on) and torch.cuda.is_available()


def nvtx_on() -> bool:
    return _nvtx


class _Range:
    __slots__ = ("name", "record", "nvtx")

    def __init__(self, name: str):
        self.name = name
        self.record = None
        self.nvtx = False  # pushed at entry: popped at exit even if switched off in between

    def __enter__(self):
        if _torch_profiler._is_profiler_enabled:  # torch's own flag, set while a profiler records
            self.record = torch.autograd.profiler.record_function(self.name)
            self.record.__enter__()
        if _nvtx:
            torch.cuda.nvtx.range_push(self.name)
            self.nvtx = True
        return self

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        if self.record is not None:
            self.record.__exit__(*exc)
        return False


def phase(name: str):
    """A context manager naming the code inside it ``name`` in profiles; free when none records."""
    if _nvtx or _torch_profiler._is_profiler_enabled:
        return _Range(name)
    return _NULL
