"""Where this process computes: the one place that decides CPU or GPU.

Everything that differs between a CUDA machine and a CPU-only one is decided
here, once per process, and read from the :class:`Runtime` instead of from
``torch.cuda.is_available()`` scattered over the code:

* the code path (``rt.cuda``): megatron-core's optimizer and DDP with its
  distributed optimizer, parameters initialised on the device, megatron-core's
  fused ops; on the CPU, :class:`megatron.training.optimizer.HostAdamW`;
* the device (``rt.device``): where this rank's tensors live;
* the process-group backend (``rt.backend``): one world for both kinds of
  tensor. On GPUs it is device-mapped, ``cpu:gloo,cuda:nccl``: CUDA tensors
  (gradients, all-to-alls) go over NCCL, CPU tensors (token counts, loss sums,
  object collectives, barriers) over gloo. megatron-core's sub-groups inherit
  the mapping, so every group accepts both. Plain ``gloo`` on the CPU;
* memory readings: allocator statistics on CUDA, the resident-set high-water
  mark (``VmHWM``) on the CPU;
* whether megatron-core needs its CUDA assumptions redirected (tensors on the CPU:
  :func:`fpdt_ext.mcore.cpu_shims.prepare` asks ``current().on_gpu``).

The code path and the device are separate fields so that the tests can run the
CUDA path's logic with tensors on the CPU (``tests/cuda_on_cpu.py``); in a
real run they agree. A process has one runtime (:func:`current`), as it has one
current CUDA device; it is set when the process group is initialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


@dataclasses.dataclass(frozen=True)
class Runtime:
    """This process's code path, device and process-group backend."""

    cuda: bool  # the GPU code path
    device: torch.device  # where this rank's tensors live
    backend: str  # of the world; megatron-core's sub-groups inherit it

    @classmethod
    def detect(cls, local_rank: Optional[int] = None) -> "Runtime":
        """CUDA when torch sees a GPU (device ``local_rank`` modulo the GPU count; default
        ``$LOCAL_RANK``), else the CPU."""
        if not torch.cuda.is_available():
            return cls(cuda=False, device=torch.device("cpu"), backend=CPU_BACKEND)
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        index = local_rank % torch.cuda.device_count()
        return cls(cuda=True, device=torch.device("cuda", index), backend=GPU_BACKEND)

    @property
    def on_gpu(self) -> bool:
        """Tensors live on a CUDA device (not only the CUDA code path)."""
        return self.device.type == "cuda"

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.on_gpu else "cpu"

    # -- memory (see the functions below) ------------------------------------------
    def memory_in_use_bytes(self) -> int:
        return memory_in_use_bytes(self.device)

    def peak_memory_bytes(self) -> int:
        return peak_memory_bytes(self.device)

    def reset_peak_memory(self) -> None:
        reset_peak_memory(self.device)

    def synchronize(self) -> None:
        synchronize(self.device)

    # -- RNG of the device --------------------------------------------------------
    def device_rng_state(self) -> Optional[torch.Tensor]:
        return torch.cuda.get_rng_state(self.device) if self.on_gpu else None

    def set_device_rng_state(self, state: Optional[torch.Tensor]) -> None:
        if state is not None and self.on_gpu:
            torch.cuda.set_rng_state(state, self.device)


def memory_in_use_bytes(device: torch.device) -> int:
    """Bytes in use now: the CUDA allocator's, or the process's resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes since the last :func:`reset_peak_memory` (on the CPU: since the process
    started, until then): the CUDA allocator's peak, or the resident-set high-water mark."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def reset_peak_memory(device: torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM <- the current resident set


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: for timings and memory readings, never in the training path."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_CURRENT: Optional[Runtime] = None


def current() -> Runtime:
    """This process's runtime (detected on first use if none was activated)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Runtime.detect()
    return _CURRENT


def activate(rt: Runtime) -> Runtime:
    """Make ``rt`` this process's runtime (and select its CUDA device)."""
    global _CURRENT
    if rt.on_gpu:
        torch.cuda.set_device(rt.device)
    _CURRENT = rt
    return rt


@contextlib.contextmanager
def using(rt: Runtime):
    """``rt`` as the runtime inside the block (tests), the previous one after it."""
    global _CURRENT
    previous = _CURRENT
    activate(rt)
    try:
        yield rt
    finally:
        _CURRENT = previous


def init_distributed(*, rank: Optional[int] = None, world_size: Optional[int] = None,
                     init_method: Optional[str] = None, timeout: datetime.timedelta = datetime.timedelta(minutes=30),
                     backend: Optional[str] = None, local_rank: Optional[int] = None) -> Runtime:
    """Activate this process's runtime and initialise the process group, if not done yet.

    Without ``rank``/``world_size`` the torchrun/SLURM environment is used (``$LOCAL_RANK``
    picks the GPU unless ``local_rank`` is given); a single process without launcher variables
    becomes a world of one on an in-memory store (no TCP port: two such jobs on one machine
    cannot collide). ``backend`` overrides the runtime's (tests map both device types to
    gloo on the CPU). Returns the runtime.
    """
    if dist.is_initialized():
        return current()
    rt = Runtime.detect(local_rank)
    if backend is not None:
        rt = dataclasses.replace(rt, backend=backend)
    activate(rt)
    if rank is None and "RANK" not in os.environ:  # no launcher: a world of one, with no TCP port to collide on
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(rt.backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
        return rt
    explicit = {k: v for k, v in dict(rank=rank, world_size=world_size, init_method=init_method).items()
                if v is not None}  # else the launcher's environment
    dist.init_process_group(rt.backend, timeout=timeout, **explicit)
    return rt
