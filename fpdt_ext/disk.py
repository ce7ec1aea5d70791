"""A disk tier below host memory: offloaded tensors kept in a file.

FPDT offloads to host memory; at millions of tokens the host itself binds (the
checkpointed layer inputs alone are ``layers x tokens x hidden`` per GPU). A
:class:`DiskTier` keeps such tensors in one unnamed file per process in a
directory the user names (an NVMe or disk path; ``--offload-dir``), as
ZeRO-Infinity does for parameters. It serves two writers:

* :class:`fpdt_ext.offload.ChunkStore` with a directory: the attention's stored
  chunks (KV, q/out/lse, dout, dq partials) go to the file instead of host buffers;
* :class:`fpdt_ext.offload.SavedTensorsToHost` with a directory: the checkpointed
  layer inputs (and anything else saved for backward outside the recomputed layers).

Each tensor gets a slot: a page-aligned byte range, recycled by exact size
(like the host pool). Writes and reads are plain ``pwrite``/``preadv`` calls,
synchronous; after each the range is dropped from the page cache
(``POSIX_FADV_DONTNEED``), so the data lives on the disk, not in RAM that the
process merely does not count. On CUDA a tensor goes through host memory on
the way (one chunk at a time); this tier is for capacity, not speed, and is not
overlapped with compute.

The file is unlinked as soon as it is opened, so nothing is left behind when the
process ends, however it ends.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
import weakref
from typing import Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

PAGE = 4096
_RAM_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


def _filesystem_type(path: str) -> Optional[str]:
    """The type of the filesystem holding ``path`` (from /proc/mounts; None where unknown)."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        return None
    return kind


def check_offload_dir(path: str) -> None:
    """Refuse a directory that cannot hold the disk tier, saying what to change."""
    if not os.path.isdir(path):
        raise ValueError(f"offload directory {path!r} does not exist; create it (on a local disk or NVMe) "
                         f"or give another --offload-dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"offload directory {path!r} is not writable by this user; give another --offload-dir")
    kind = _filesystem_type(path)
    if kind in _RAM_FILESYSTEMS:
        raise ValueError(f"offload directory {path!r} is on {kind}, which is RAM: offloading there saves no "
                         f"memory; give a directory on a disk (e.g. a local NVMe scratch path)")


@dataclasses.dataclass(eq=False)
class DiskSlot:
    """One tensor's place in the file; its bytes go back to the tier when freed or collected."""

    offset: int
    capacity: int  # bytes reserved, a multiple of PAGE
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    _release: Optional[weakref.finalize] = dataclasses.field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def free(self) -> None:
        """Give the bytes back now (idempotent; otherwise when the slot is collected)."""
        if self._release is not None:
            self._release()


def _as_bytes(t: Tensor) -> Tensor:
    """A contiguous CPU uint8 view of ``t``'s data (copying only when needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous().view(-1).view(torch.uint8)


class DiskTier:
    """Tensors in one unnamed file in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str):
        check_offload_dir(directory)
        self.directory = directory
        self._fd = self._open(directory)
        self._free: Dict[int, List[int]] = collections.defaultdict(list)  # capacity -> offsets
        self._end = 0  # file length in use
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0
        self.bytes_written = 0
        self.bytes_read = 0
        weakref.finalize(self, os.close, self._fd)

    @staticmethod
    def _open(directory: str) -> int:
        if hasattr(os, "O_TMPFILE"):
            try:
                return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
            except OSError:  # not supported by this filesystem
                pass
        fd, name = tempfile.mkstemp(prefix="fpdt-offload-", dir=directory)
        os.unlink(name)
        return fd

    # -- slots --------------------------------------------------------------
    def _allocate(self, nbytes: int) -> Tuple[int, int]:
        """(offset, capacity) of a free range for ``nbytes``, page-aligned."""
        capacity = max(PAGE, -(-nbytes // PAGE) * PAGE)
        free = self._free[capacity]
        offset = free.pop() if free else self._grow(capacity)
        self.bytes_in_use += capacity
        self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.bytes_in_use)
        return offset, capacity

    def _grow(self, capacity: int) -> int:
        offset, self._end = self._end, self._end + capacity
        return offset

    def _give_back(self, offset: int, capacity: int) -> None:
        self._free[capacity].append(offset)
        self.bytes_in_use -= capacity

    # -- I/O ------------------------------------------------------------------
    def write(self, tensor: Tensor, slot: Optional[DiskSlot] = None) -> DiskSlot:
        """Store ``tensor``; into ``slot`` when given (same shape and dtype), else a new slot."""
        data = _as_bytes(tensor)
        if slot is None:
            offset, capacity = self._allocate(data.numel())
            slot = DiskSlot(offset, capacity, tensor.shape, tensor.dtype, tensor.device)
            slot._release = weakref.finalize(slot, self._give_back, offset, capacity)
        elif (slot.shape, slot.dtype) != (tensor.shape, tensor.dtype):
            raise ValueError(f"slot holds {tuple(slot.shape)} {slot.dtype}, cannot take "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], slot.offset + done)
        self._drop_cache(slot)
        self.bytes_written += len(view)
        return slot

    def read(self, slot: DiskSlot, device: Optional[torch.device] = None) -> Tensor:
        """A fresh tensor with the slot's contents, on ``device`` (default: where it came from)."""
        buffer = torch.empty(slot.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], slot.offset + done)
            if n == 0:
                raise RuntimeError(f"offload file in {self.directory!r} ended early at byte {slot.offset + done}")
            done += n
        self._drop_cache(slot)
        self.bytes_read += len(view)
        out = buffer.view(slot.dtype).view(slot.shape)
        device = slot.device if device is None else torch.device(device)
        return out if device.type == "cpu" else out.to(device)

    def _drop_cache(self, slot: DiskSlot) -> None:
        # Starts writeback of a fresh write and evicts clean pages: the bytes leave RAM.
        os.posix_fadvise(self._fd, slot.offset, slot.capacity, os.POSIX_FADV_DONTNEED)

    def file_bytes(self) -> int:
        """Bytes of the file laid out so far (its high-water mark)."""
        return self._end


_TIERS: Dict[str, DiskTier] = {}


def disk_tier(directory: str) -> DiskTier:
    """The process-wide tier for ``directory`` (one file per process and directory)."""
    key = os.path.realpath(directory)
    if key not in _TIERS:
        _TIERS[key] = DiskTier(directory)
    return _TIERS[key]



def disk_peak_bytes() -> int:
    """The most bytes this process has held on disk tiers at once (summed over directories)."""
    return sum(t.peak_bytes_in_use for t in _TIERS.values())
