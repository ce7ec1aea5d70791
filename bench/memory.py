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

MMAP_THRESHOLD = "65536"


def malloc_env() -> None:
    """Make glibc return freed large blocks to the OS in processes started after this."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """``with PeakMemory(device) as m: work()`` then ``m.peak_bytes``."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak_bytes = _status_kib("VmHWM") * 1024 - self._base
        return False
