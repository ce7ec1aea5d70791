"""Run the CUDA code path with tensors on the CPU, so its logic is tested where no GPU exists.

``with cuda_path_on_cpu(): ...`` makes :func:`fpdt_ext.runtime.current` say "CUDA path,
CPU device" and substitutes the device calls that library code makes with literal CUDA
devices, through a torch function mode:

* a factory or ``.to()`` asked for a ``cuda`` device (a string, ``torch.device`` or an index)
  gets the CPU;
* ``tensor.cuda()`` returns the tensor;
* ``tensor.type()`` names the CUDA type (``torch.cuda.BFloat16Tensor``), which is what
  megatron-core's optimizers check before they accept a parameter;
* code inside a backward pass (autograd hooks, custom backward functions) is covered too.
  ``tensor.backward()`` and ``torch.autograd.backward`` are torch functions themselves, which a
  mode's handler runs with the mode popped, so the mode runs the autograd engine itself with
  the mode in place.

CUDA streams and events (Megatron-FSDP overlaps its gathers and reductions on side streams) are
stand-ins that do nothing: gloo's collectives are synchronous, so there is nothing to wait for.
``torch.cuda.current_device()`` answers 0, as on a GPU machine (the CPU shims answer "cpu").
Nothing else changes: collectives run on the process group as created (tests use the
device-mapped backend a GPU run uses, with gloo for both device types), kernels are the
CPU's. What this cannot show (kernels, streams, NCCL, memory)
is listed in docs/GPU_PATHS.md.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from fpdt_ext import runtime
from fpdt_ext.mcore import cpu_shims

# The backend a GPU run uses (cpu:gloo,cuda:nccl), with gloo standing in for NCCL.
MAPPED_BACKEND = "cpu:gloo,cuda:gloo"
CPU = torch.device("cpu")


def _backward(func, args, kwargs):
    """``tensor.backward(...)`` or ``torch.autograd.backward(...)``, as the latter runs after its
    torch-function dispatch (torch 2.x): its own argument handling, then the autograd engine."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    call = inspect.signature(func).bind(*args, **kwargs).arguments
    tensors = call.get("self", call.get("tensors"))
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _tensor_or_tensors_to_tuple(call.get("gradient", call.get("grad_tensors")), len(tensors))
    create_graph = call.get("create_graph", False)
    retain_graph = call.get("retain_graph")
    inputs = _tensor_or_tensors_to_tuple(call.get("inputs"), 0) if call.get("inputs") is not None else ()
    _engine_run_backward(tensors, _make_grads(tensors, grads, is_grads_batched=False),
                         create_graph if retain_graph is None else retain_graph, create_graph, inputs,
                         allow_unreachable=True, accumulate_grad=True)


class CudaCallsOnCpu(cpu_shims.CudaToCPU):
    """CUDA device requests answered with the CPU (fpdt_ext's mode), inside backward passes too;
    CPU tensors report CUDA types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") == "type" and len(args) == 1 and not kwargs
                and isinstance(args[0], torch.Tensor)):
            return "torch.cuda." + torch.Tensor.type(args[0]).rsplit(".", 1)[-1]
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            with self:
                return _backward(func, args, kwargs or {})
        return super().__torch_function__(func, types, args, kwargs)


class _Stream:
    """``torch.cuda.Stream`` on the CPU: work is done when it is issued."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def record_event(self, event=None):
        return event or _Event()


class _Event(_Stream):
    """``torch.cuda.Event`` on the CPU."""

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass


# what a GPU machine's torch.cuda answers (current_device: an index, which the mode sends to the CPU)
_CUDA_CALLS = {"Stream": _Stream, "Event": _Event, "current_stream": lambda device=None: _Stream(),
               "default_stream": lambda device=None: _Stream(),
               "stream": lambda stream=None: contextlib.nullcontext(), "current_device": lambda: 0,
               # the "device" generator is the CPU's (as cpu_shims' model-parallel RNG tracker)
               "get_rng_state": lambda device="cuda": torch.get_rng_state(),
               "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state)}


@contextlib.contextmanager
def _cuda_calls():
    cpu_shims.install()  # first, so that its own redirection (installed once) does not replace these
    saved = {name: getattr(torch.cuda, name) for name in _CUDA_CALLS}
    for name, value in _CUDA_CALLS.items():
        setattr(torch.cuda, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


@contextlib.contextmanager
def cuda_path_on_cpu():
    """The CUDA code path (``runtime.current().cuda``) with every tensor on the CPU."""
    rt = runtime.Runtime(cuda=True, device=CPU, backend=MAPPED_BACKEND)
    mode = CudaCallsOnCpu()
    with runtime.using(rt), _cuda_calls(), mode:
        yield mode
