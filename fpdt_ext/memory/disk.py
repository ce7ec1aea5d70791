"""A disk tier below host memory: offloaded tensors kept in a file.

FPDT offloads to host memory; at millions of tokens the host itself binds (the
checkpointed layer inputs alone are ``layers x tokens x hidden`` per GPU). A
:class:`DiskTier` keeps such tensors in one unnamed file per process in a
directory the user names (an NVMe or disk path; ``--offload-dir``), as
ZeRO-Infinity does for parameters. It serves two writers:

* :class:`fpdt_ext.memory.offload.ChunkStore` with a directory: the attention's stored
  chunks (KV, q/out/lse, dout, dq partials) go to the file instead of host buffers;
* :class:`fpdt_ext.memory.offload.SavedTensorsToHost` with a directory: the checkpointed
  layer inputs (and anything else saved for backward outside the recomputed layers).

Each tensor gets a slot: a page-aligned byte range, recycled by exact size
(like the host pool). The file is opened ``O_DIRECT`` where the filesystem
allows it: the disk's DMA moves the bytes, no page cache holds them (RAM the
process would not count) and the I/O costs almost no CPU. Elsewhere it goes
through the page cache and each range is dropped after its I/O
(``POSIX_FADV_DONTNEED``).

All I/O runs on one thread per tier, in the order it was asked for, so a read
queued after a write of the same slot sees that write. ``write`` copies the
tensor into a page-aligned staging buffer and returns (at most
``MAX_QUEUED_WRITES`` wait in the queue); ``read_async`` returns a
:class:`Reading` whose ``wait`` gives the tensor, so the chunk loops'
prefetches overlap compute. A failed write (say, a full disk) is raised by the
next call. On CUDA a tensor goes through (pageable) host memory on the way.

The file is unlinked as soon as it is opened, so nothing is left behind when the
process ends, however it ends.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

PAGE = 4096
MAX_QUEUED_WRITES = 8  # writes in flight before write() waits for the oldest (each holds a staging copy)
STAGING_KEEP_BYTES = 4 << 20  # staging buffers up to this size are reused (chunk-sized; larger ones
# are allocated per write, so that no buffer the size of a whole layer input stays)
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


def _aligned_bytes(nbytes: int) -> Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes`` starting on a page boundary (as
    ``O_DIRECT`` needs of a buffer)."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start:start + nbytes]


class Reading:
    """A read in flight; :meth:`wait` gives the tensor, on the device asked for."""

    def __init__(self, tier: "DiskTier", future: Future, buffer: Tensor, slot: DiskSlot, device: torch.device):
        self._tier, self._future, self._buffer = tier, future, buffer
        self._shape, self._dtype, self._device = slot.shape, slot.dtype, device

    def wait(self) -> Tensor:
        self._future.result()
        self._tier.check()  # the writes queued before this read have run: raise their error, if any
        out = self._buffer[:self._shape.numel() * self._dtype.itemsize].view(self._dtype).view(self._shape)
        return out if self._device.type == "cpu" else out.to(self._device)


def _shut(executor: ThreadPoolExecutor, fd: int) -> None:
    executor.shutdown(wait=True)  # queued writes land before the file is closed
    os.close(fd)


class DiskTier:
    """Tensors in one unnamed file in ``directory`` (see the module docstring).

    ``direct``: ``True`` requires ``O_DIRECT``; ``False`` goes through the page cache, each
    range dropped after its I/O; ``None`` (default) takes ``O_DIRECT`` where the filesystem
    supports it.
    """

    def __init__(self, directory: str, direct: Optional[bool] = None):
        check_offload_dir(directory)
        self.directory = directory
        self._fd, self.direct = self._open(directory, direct)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fpdt-disk")
        self._writes: Deque[Future] = collections.deque()  # queued writes, oldest first
        self._staging: Dict[int, List[Tensor]] = collections.defaultdict(list)  # capacity -> free buffers
        self._free: Dict[int, List[int]] = collections.defaultdict(list)  # capacity -> offsets
        self._end = 0  # file length in use
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0
        self.bytes_written = 0
        self.bytes_read = 0
        weakref.finalize(self, _shut, self._io, self._fd)

    @staticmethod
    def _open(directory: str, direct: Optional[bool]) -> Tuple[int, bool]:
        """A new unnamed file in ``directory``: (descriptor, whether it is ``O_DIRECT``)."""
        has_direct = hasattr(os, "O_DIRECT")
        for use_direct in ((has_direct, False) if direct is None else (direct,)):
            if use_direct and not has_direct:  # O_DIRECT required where the platform has none
                continue
            flags = os.O_RDWR | (os.O_DIRECT if use_direct else 0)
            try:
                fd = DiskTier._open_unnamed(directory, flags)
            except OSError:  # O_DIRECT refused at open
                continue
            if not use_direct or DiskTier._direct_io_works(fd):
                return fd, use_direct
            os.close(fd)
        raise ValueError(f"offload directory {directory!r} does not support O_DIRECT; give a directory on a "
                         f"local disk or NVMe, or let the disk tier use the page cache")

    @staticmethod
    def _open_unnamed(directory: str, flags: int) -> int:
        if hasattr(os, "O_TMPFILE"):
            try:
                return os.open(directory, os.O_TMPFILE | flags, 0o600)
            except OSError:  # no O_TMPFILE on this filesystem: a named file, unlinked at once
                pass
        fd, name = tempfile.mkstemp(prefix="fpdt-offload-", dir=directory)
        try:
            return os.open(name, flags)
        finally:
            os.close(fd)
            os.unlink(name)

    @staticmethod
    def _direct_io_works(fd: int) -> bool:
        """Some filesystems accept ``O_DIRECT`` at open and refuse the I/O; try one page."""
        page = _aligned_bytes(PAGE)
        try:
            return os.pwrite(fd, memoryview(page.numpy()), 0) == PAGE
        except OSError:
            return False

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
        # A write still queued for this range runs before any later one (one I/O thread, in order).
        self._free[capacity].append(offset)
        self.bytes_in_use -= capacity

    # -- I/O ------------------------------------------------------------------
    def write(self, tensor: Tensor, slot: Optional[DiskSlot] = None) -> DiskSlot:
        """Store ``tensor``; into ``slot`` when given (same shape and dtype), else a new slot.

        The bytes are copied into a staging buffer and written on the I/O thread: the caller
        may change or free ``tensor`` at once. Reads queued later see this write.
        """
        nbytes = tensor.numel() * tensor.dtype.itemsize
        if slot is None:
            offset, capacity = self._allocate(nbytes)
            slot = DiskSlot(offset, capacity, tensor.shape, tensor.dtype, tensor.device)
            slot._release = weakref.finalize(slot, self._give_back, offset, capacity)
        elif (slot.shape, slot.dtype) != (tensor.shape, tensor.dtype):
            raise ValueError(f"slot holds {tuple(slot.shape)} {slot.dtype}, cannot take "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        staging = self._stage(slot.capacity)
        # One copy, from any device and any strides, straight into the staging buffer.
        staging[:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
        length = slot.capacity if self.direct else nbytes  # O_DIRECT writes whole pages
        self._writes.append(self._io.submit(_pwrite, self._fd, self.direct, self.directory, staging, length, slot.offset,
                                            self._staging))
        self.bytes_written += nbytes
        self.check()
        while len(self._writes) > MAX_QUEUED_WRITES:  # bounds the staging memory
            self._writes.popleft().result()
        return slot

    def read(self, slot: DiskSlot, device: Optional[torch.device] = None) -> Tensor:
        """A fresh tensor with the slot's contents, on ``device`` (default: where it came from)."""
        return self.read_async(slot, device).wait()

    def read_async(self, slot: DiskSlot, device: Optional[torch.device] = None) -> Reading:
        """Start reading the slot on the I/O thread; the :class:`Reading`'s ``wait`` gives the tensor."""
        length = slot.capacity if self.direct else slot.nbytes
        buffer = _aligned_bytes(length)
        future = self._io.submit(_pread, self._fd, self.direct, self.directory, buffer, slot.offset)
        self.bytes_read += slot.nbytes
        return Reading(self, future, buffer, slot, slot.device if device is None else torch.device(device))

    def check(self) -> None:
        """Raise the error of any finished write (e.g. the disk is full)."""
        while self._writes and self._writes[0].done():
            self._writes.popleft().result()

    def flush(self) -> None:
        """Wait for every queued write (raising its error)."""
        while self._writes:
            self._writes.popleft().result()

    def _stage(self, capacity: int) -> Tensor:
        free = self._staging[capacity]
        return free.pop() if free else _aligned_bytes(capacity)

    def file_bytes(self) -> int:
        """Bytes of the file laid out so far (its high-water mark)."""
        return self._end


# -- on the I/O thread (module functions: a job must not hold the tier, whose collection
# would then run its finaliser on this thread) ---------------------------------------------
def _pwrite(fd: int, direct: bool, directory: str, staging: Tensor, length: int, offset: int,
            keep: Dict[int, List[Tensor]]) -> None:
    view = memoryview(staging.numpy())[:length]
    done = 0
    try:
        while done < length:
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        raise OSError(e.errno, f"writing {length} bytes to the offload file in {directory!r} failed "
                               f"({e.strerror}); free space there or give another --offload-dir") from e
    _drop_cache(fd, direct, offset, length)
    if staging.numel() <= STAGING_KEEP_BYTES:  # small buffers are kept for the next write
        keep[staging.numel()].append(staging)


def _pread(fd: int, direct: bool, directory: str, buffer: Tensor, offset: int) -> None:
    view = memoryview(buffer.numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise RuntimeError(f"offload file in {directory!r} ended early at byte {offset + done}")
        done += n
    _drop_cache(fd, direct, offset, len(view))


def _drop_cache(fd: int, direct: bool, offset: int, length: int) -> None:
    # Buffered only (O_DIRECT bypasses the cache): starts writeback of a fresh write and evicts
    # clean pages, so the bytes leave RAM.
    if not direct:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
