"""Run the CUDA code path with tensors on the CPU, so its logic is tested where no GPU exists.

``with cuda_path_on_cpu(): ...`` makes :func:`fpdt_ext.runtime.current` say "CUDA path,
CPU device" and substitutes the device calls that library code makes with literal CUDA
devices, through a torch function mode:

* a factory or ``.to()`` asked for a ``cuda`` device (a string, ``torch.device`` or an index)
  gets the CPU;
* ``tensor.cuda()`` returns the tensor;
* ``tensor.type()`` names the CUDA type (``torch.cuda.BFloat16Tensor``), which is what
  megatron-core's optimizers check before they accept a parameter.

Nothing else changes: collectives run on the process group as created (tests use the
device-mapped backend a GPU run uses, with gloo for both device types), kernels are the
CPU's, and no stream or event exists. What this cannot show (kernels, streams, NCCL, memory)
is listed in docs/GPU_PATHS.md.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from fpdt_ext import runtime

# The backend a GPU run uses (cpu:gloo,cuda:nccl), with gloo standing in for NCCL.
MAPPED_BACKEND = "cpu:gloo,cuda:gloo"
CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class CudaCallsOnCpu(TorchFunctionMode):
    """CUDA device requests answered with the CPU; CPU tensors report CUDA types."""

    def __init__(self):
        super().__init__()
        self.redirected = 0  # how many calls asked for a CUDA device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = CPU
            self.redirected += 1
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            self.redirected += 1
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return "torch.cuda." + torch.Tensor.type(args[0]).rsplit(".", 1)[-1]
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], CPU, *args[2:])
            self.redirected += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_path_on_cpu():
    """The CUDA code path (``runtime.current().cuda``) with every tensor on the CPU."""
    rt = runtime.Runtime(cuda=True, device=CPU, backend=MAPPED_BACKEND)
    mode = CudaCallsOnCpu()
    with runtime.using(rt), mode:
        yield mode
