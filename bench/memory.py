"""Peak memory of a piece of work in this process, on CPU or CUDA.

CPU: the resident-set high-water mark (VmHWM) is reset through
/proc/self/clear_refs before the work and read after it; the peak minus the
resident size at the start is what the work added. For freed memory to leave
the process (so the next measurement starts clean), large allocations must be
mmap-backed: the benchmarks set ``MALLOC_MMAP_THRESHOLD_`` for their worker
processes (see :func:`malloc_env`). CUDA: torch's allocator statistics.
"""

from __future__ import annotations

import gc
import os

import torch

from fpdt_ext import runtime

MMAP_THRESHOLD = "65536"


def malloc_env() -> None:
    """Make glibc return freed large blocks to the OS in processes started after this."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)


class PeakMemory:
    """``with PeakMemory(device) as m: work()`` then ``m.peak_bytes``: what the work added at its peak."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        gc.collect()
        runtime.synchronize(self.device)
        runtime.reset_peak_memory(self.device)
        self._base = runtime.memory_in_use_bytes(self.device)
        return self

    def __exit__(self, *exc):
        runtime.synchronize(self.device)
        self.peak_bytes = runtime.peak_memory_bytes(self.device) - self._base
        return False
