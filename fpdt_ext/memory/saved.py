"""Tensors saved for backward, kept in host memory or on disk: the checkpointed layer inputs of
full recompute, offloaded as in the FPDT paper's recipe."""

from __future__ import annotations

from typing import Optional

import torch

from fpdt_ext.memory.disk import DiskSlot
from fpdt_ext.memory.offload import MemoryTiers

Tensor = torch.Tensor


class SavedTensorsToHost(torch.autograd.graph.saved_tensors_hooks):
    """Keep tensors saved for backward in host memory (the checkpointed layer
    inputs of full recompute, in the FPDT paper's recipe), or on the disk tier of
    ``tiers`` (:mod:`fpdt_ext.memory.disk`) when it has a directory.

    Tensors smaller than ``min_bytes`` and parameters stay where they are. On
    CUDA the copy out runs on the side stream ([offload-after-produce]) into
    pinned memory; the copy back runs on the compute stream when backward
    needs the tensor. On the CPU it is a real copy, as everywhere in this module.
    A disk slot is freed when autograd drops the saved tensor.
    """

    def __init__(self, tiers: Optional[MemoryTiers] = None, min_bytes: int = 1 << 16):
        super().__init__(self._pack, self._unpack)
        self.min_bytes = min_bytes
        self._tiers = tiers or MemoryTiers()
        self._disk = self._tiers.disk if self._tiers.directory else None

    def _pack(self, t: Tensor):
        if isinstance(t, torch.nn.Parameter) or t.numel() * t.element_size() < self.min_bytes:
            return t
        if self._disk is not None:
            return self._disk.write(t)
        stream = self._tiers.stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=stream is not None)
        if stream is None:
            return (host.copy_(t), t.device, None)
        produced = torch.cuda.current_stream(t.device).record_event()
        stream.wait_event(produced)  # [offload-after-produce]
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # [record-stream]
            done = stream.record_event()
        return (host, t.device, done)

    def _unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        if isinstance(packed, DiskSlot):
            return self._disk.read(packed)
        host, device, done = packed
        if done is None:
            return host.clone()
        torch.cuda.current_stream(device).wait_event(done)  # the copy out finished before we read back
        return host.to(device, non_blocking=True)
