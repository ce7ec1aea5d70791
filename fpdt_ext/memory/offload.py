"""Where FPDT's chunk tensors live: on the compute device, or offloaded to host.

Objects, all explicit:

* :class:`HostBufferPool` - reusable host buffers keyed by exact (dtype, numel).
  On CUDA they are pinned and allocated once, then recycled across chunks,
  layers and iterations (no per-chunk ``pin_memory()``; no power-of-two
  rounding waste on reuse).
* :class:`MemoryTiers` - one model's pools, its side stream per device (on
  which every host<->device copy runs) and its disk tier; made and handed
  around explicitly.
* :class:`ChunkStore` - one kind of per-chunk tensors (e.g. the KV chunks of
  one attention call). ``put`` stores (offloading when on), ``prefetch``
  starts a fetch, ``get`` returns device tensors, ``release`` says the caller
  is done with them, ``pop`` forgets a chunk. A :class:`Residency` counter
  records how many chunks of each kind are on the compute device, so tests can
  bound it. When its tiers have a directory, its offloaded copies go to a file
  there instead of host buffers (:mod:`fpdt_ext.memory.disk`: written and read on
  its I/O thread, so a ``prefetch`` overlaps compute there too).

On the CPU there is no separate device memory, but offload still makes real
copies into separate host buffers, and a fetched copy is poisoned (NaN) when
released, so a use-after-release in the algorithm shows up as a wrong result
in the CPU tests.

Synchronisation points (CUDA), each named at its call:
  [offload-after-produce]  the side stream waits for an event recorded on the
                           compute stream after the tensor was written;
  [fetch-before-use]       the compute stream waits for the fetch's event;
  [record-stream]          tensors used across streams are recorded on the
                           other stream, so the caching allocator does not
                           reuse their memory early.
No ``synchronize()`` and no barriers.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fpdt_ext.memory.disk import DiskTier, Reading
from fpdt_ext.profiling import OFFLOAD, OFFLOAD_WAIT, PREFETCH, phase

Tensor = torch.Tensor


class HostBufferPool:
    """Recycled host buffers, exact size; pinned when ``pin`` (CUDA)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: Dict[Tuple[torch.dtype, int], List[Tensor]] = collections.defaultdict(list)
        self.num_allocated = 0
        self.bytes_allocated = 0

    def acquire(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        free = self._free[(dtype, numel)]
        if free:
            flat = free.pop()
        else:
            flat = torch.empty(numel, dtype=dtype, pin_memory=self.pin)
            self.num_allocated += 1
            self.bytes_allocated += flat.numel() * flat.element_size()
        return flat.view(shape)

    def release(self, buffer: Tensor) -> None:
        """Give a buffer from :meth:`acquire` back (all its pending copies are on the side stream)."""
        self._free[(buffer.dtype, buffer.numel())].append(buffer.view(-1))

    def num_free(self) -> int:
        return sum(len(v) for v in self._free.values())

    def clear(self) -> None:
        self._free.clear()


class MemoryTiers:
    """The memory below the device that one model's offloaded tensors use: recycled host buffers
    (pinned for CUDA), one side stream per CUDA device on which every host<->device copy runs,
    and with a ``directory`` the disk tier (one file, opened at first use).

    Explicit, never process-wide: whoever builds a model makes one and hands it to everything
    that offloads for that model (the trainer: the FPDT modules, through the spec, and
    :class:`~fpdt_ext.memory.saved.SavedTensorsToHost`), and reads the disk's peak from it.
    Because all copies of a device share its stream, a host buffer handed back to the pool
    after its fetch was queued can be refilled by a later offload without any event: the
    stream orders them.
    """

    def __init__(self, directory: Optional[str] = None):
        self.directory = directory
        self._pools: Dict[bool, HostBufferPool] = {}
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._disk: Optional[DiskTier] = None

    def pool(self, device: torch.device) -> HostBufferPool:
        """The host buffers for offloading from ``device`` (pinned for CUDA)."""
        pin = torch.device(device).type == "cuda"
        if pin not in self._pools:
            self._pools[pin] = HostBufferPool(pin)
        return self._pools[pin]

    def stream(self, device: torch.device) -> Optional["torch.cuda.Stream"]:
        """The side stream for copies to and from a CUDA ``device`` (None on the CPU)."""
        device = torch.device(device)
        if device.type != "cuda":
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @property
    def disk(self) -> DiskTier:
        """The disk tier in ``directory`` (its file is opened on first use)."""
        if self.directory is None:
            raise ValueError("these memory tiers have no disk: give a directory (--offload-dir)")
        if self._disk is None:
            self._disk = DiskTier(self.directory)
        return self._disk

    def host_bytes_allocated(self) -> int:
        """Bytes of host buffers the offload has allocated (they are recycled, not freed)."""
        return sum(pool.bytes_allocated for pool in self._pools.values())

    def peak_disk_bytes(self) -> int:
        """The most bytes held on the disk tier at once (0 if it was never used)."""
        return self._disk.peak_bytes_in_use if self._disk is not None else 0


class Residency:
    """Counts chunks per kind on the compute device; keeps the peak of each. Also counts, per
    kind, the fetches back to the device and the misses among them: a ``get`` of a chunk that
    was neither on the device nor prefetched, so it is fetched then and there (on CUDA the
    compute stream waits for the whole copy). The chunk loops prefetch every chunk they fetch."""

    def __init__(self):
        self.current: Dict[str, int] = collections.Counter()
        self.peak: Dict[str, int] = collections.Counter()
        self.fetches: Dict[str, int] = collections.Counter()
        self.misses: Dict[str, int] = collections.Counter()

    def add(self, kind: str, n: int = 1) -> None:
        self.current[kind] += n
        self.peak[kind] = max(self.peak[kind], self.current[kind])

    def reset_peak(self) -> None:
        self.peak = collections.Counter(self.current)


@dataclasses.dataclass
class _Entry:
    host: Optional[Tuple[Tensor, ...]] = None  # offloaded copy (offload on): host tensors or disk slots
    device: Optional[Tuple[Tensor, ...]] = None  # copy on the compute device, if resident
    ready: Optional["torch.cuda.Event"] = None  # fetch finished (CUDA)
    reading: Optional[Tuple[Reading, ...]] = None  # reads in flight from a disk tier
    fetched: bool = False  # device copy is ours (made by a fetch), not the caller's
    versions: Optional[Tuple[int, ...]] = None  # the caller's tensors' versions when put (offload on)


class ChunkStore:
    """Per-chunk tensors of one kind, resident or offloaded."""

    def __init__(self, kind: str, device: torch.device, *, offload: bool, residency: Residency,
                 tiers: Optional[MemoryTiers] = None):
        """``tiers``: where offloaded chunks go (default: host memory of a new, private
        :class:`MemoryTiers`); to its disk when it has a directory."""
        self.kind = kind
        self.device = torch.device(device)
        self.offload = offload
        self.residency = residency
        self._entries: Dict[int, _Entry] = {}
        tiers = tiers or MemoryTiers()
        self._disk = tiers.disk if offload and tiers.directory else None
        on_host = offload and self._disk is None
        self._stream = tiers.stream(self.device) if on_host else None
        self._pool = tiers.pool(self.device) if on_host else None

    # -- storing ----------------------------------------------------------
    def put(self, idx: int, tensors: Sequence[Tensor]) -> None:
        """Store chunk ``idx``. The store takes ``tensors`` over: the caller may read them until
        :meth:`release` and may drop them at any time, but must not write them again. With
        offload on CUDA the copy to host runs on the side stream after ``put`` returns (ordered
        after the work that produced them), so a later write could race it; a write made
        before :meth:`release` is caught there on every device (the CPU tests find it).

        Putting an index again overwrites its stored copy (same shapes): to change a chunk,
        write into the copy :meth:`get` returns (or a new tensor) and put that, as an
        accumulator written back after an update.
        """
        tensors = tuple(tensors)
        entry = self._entries.get(idx)
        if entry is None:
            entry = self._entries[idx] = _Entry()
        self._land(entry)
        if entry.device is None:
            self.residency.add(self.kind)
        entry.device, entry.fetched, entry.ready = tensors, False, None
        if not self.offload:
            return
        with phase(OFFLOAD):
            self._offload(entry, tensors)

    def _offload(self, entry: _Entry, tensors: Tuple[Tensor, ...]) -> None:
        entry.versions = tuple(t._version for t in tensors)
        if self._disk is not None:
            slots = entry.host or (None,) * len(tensors)
            entry.host = tuple(self._disk.write(t, slot) for t, slot in zip(tensors, slots))
            return
        if entry.host is None:
            entry.host = tuple(self._pool.acquire(t.shape, t.dtype) for t in tensors)
        if self._stream is None:
            for host, dev in zip(entry.host, tensors):
                host.copy_(dev)
            return
        produced = torch.cuda.current_stream(self.device).record_event()
        self._stream.wait_event(produced)  # [offload-after-produce]
        with torch.cuda.stream(self._stream):
            for host, dev in zip(entry.host, tensors):
                host.copy_(dev, non_blocking=True)
                dev.record_stream(self._stream)  # [record-stream] dev may be freed before the copy ran

    # -- fetching ---------------------------------------------------------
    def prefetch(self, idx: int) -> None:
        """Start bringing chunk ``idx`` to the device (no-op if resident)."""
        entry = self._entries[idx]
        if entry.device is not None or entry.reading is not None:
            return
        self.residency.add(self.kind)
        self.residency.fetches[self.kind] += 1
        with phase(PREFETCH):
            if self._disk is not None:
                entry.reading = tuple(self._disk.read_async(slot, self.device) for slot in entry.host)
            elif self._stream is None:
                entry.device = tuple(h.clone() for h in entry.host)
            else:
                with torch.cuda.stream(self._stream):
                    entry.device = tuple(
                        torch.empty_like(h, device=self.device).copy_(h, non_blocking=True) for h in entry.host
                    )
                    entry.ready = self._stream.record_event()
        entry.fetched = True

    def get(self, idx: int) -> Tuple[Tensor, ...]:
        """Chunk ``idx`` on the device (fetching now if it was not prefetched)."""
        entry = self._entries[idx]
        if entry.device is None and entry.reading is None:
            self.residency.misses[self.kind] += 1
        self.prefetch(idx)
        if entry.reading is None and entry.ready is None:
            return entry.device  # on the device already: nothing to wait for
        with phase(OFFLOAD_WAIT):
            self._land(entry)
            if entry.ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(entry.ready)  # [fetch-before-use]
                for t in entry.device:
                    t.record_stream(current)  # [record-stream] allocated on the side stream
                entry.ready = None
        return entry.device

    def release(self, idx: int) -> None:
        """The caller is done with the device copy; it leaves the device when offloaded."""
        entry = self._entries[idx]
        self._land(entry)
        if not self.offload or entry.device is None:
            return
        if entry.fetched:
            self._poison(entry.device)
        elif tuple(t._version for t in entry.device) != entry.versions:
            raise RuntimeError(f"a {self.kind} tensor of chunk {idx} was written after it was put (its copy to host "
                               "may have read it half-written); put a new tensor instead of writing the one handed over")
        entry.device, entry.ready, entry.fetched = None, None, False
        self.residency.add(self.kind, -1)

    def pop(self, idx: int) -> None:
        """Forget chunk ``idx``; its host buffers go back to the pool."""
        self.release(idx)
        entry = self._entries.pop(idx)
        if entry.device is not None:
            self.residency.add(self.kind, -1)
        if entry.host is not None:
            for h in entry.host:
                if self._disk is not None:
                    h.free()
                else:
                    self._pool.release(h)

    @staticmethod
    def _land(entry: _Entry) -> None:
        """Wait for the entry's disk reads, if any: they become its device copy."""
        if entry.reading is not None:
            entry.device, entry.reading = tuple(r.wait() for r in entry.reading), None

    def has(self, idx: int) -> bool:
        return idx in self._entries

    def close(self) -> None:
        for idx in list(self._entries):
            self.pop(idx)

    # -- autograd plumbing -------------------------------------------------
    def stored_tensors(self) -> List[Tensor]:
        """Every stored tensor, for ``ctx.save_for_backward`` (host copies when offloaded; none
        on a disk tier, whose slots stay in the store)."""
        return [t for idx in sorted(self._entries) for t in self._stored(self._entries[idx])]

    def restore(self, tensors: Sequence[Tensor]) -> None:
        """Swap in the tensors autograd hands back (same order as :meth:`stored_tensors`)."""
        it = iter(tensors)
        for idx in sorted(self._entries):
            entry = self._entries[idx]
            fresh = tuple(next(it) for _ in self._stored(entry))
            if self._disk is not None:
                continue
            if self.offload:
                entry.host = fresh
            else:
                entry.device = fresh

    def _stored(self, entry: _Entry) -> Tuple[Tensor, ...]:
        if self._disk is not None:
            return ()
        return entry.host if self.offload else entry.device

    def _poison(self, tensors: Sequence[Tensor]) -> None:
        # CPU only: make a use-after-release visible. On CUDA the memory is
        # simply returned to the caching allocator.
        if self.device.type == "cpu":
            for t in tensors:
                if t.is_floating_point():
                    t.fill_(float("nan"))
