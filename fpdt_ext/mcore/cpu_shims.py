"""megatron-core on a machine without CUDA: the few places it assumes CUDA, redirected.

megatron-core 0.16 runs its GPT model, DDP wrapper, recompute and distributed checkpointing on
the CPU once four assumptions are redirected; :func:`install` does exactly that:

1. Device lookups: layers, buffers and the rotary embedding ask ``torch.cuda.current_device()``
   where to allocate; the answer becomes "cpu".
2. The RNG tracker: megatron keeps named CUDA generator states (model-parallel and
   data-parallel streams) and saves/restores "the CUDA RNG state" around activation
   recompute. A CPU tracker with the same named streams stands in, and the CUDA state
   getters/setters use the CPU generator, so recompute replays dropout masks exactly.
3. Mask helpers: the default causal mask of megatron-core's local core attention is built
   on "cuda"; it is built on the CPU instead.
4. Synchronisation: dist_checkpointing calls ``torch.cuda.synchronize()`` after copying tensors
   to host memory; on the CPU there is nothing to wait for.

One more is scoped rather than installed, for the pipeline: megatron-core's schedules create a
few tensors with a literal ``device="cuda"`` (a token counter), and a pipelined model's last
stage moves its copy of a tied embedding with ``.cuda()`` before it syncs it with the first
stage; :func:`cuda_tensors_on_cpu` keeps them on the CPU while a schedule runs or a model is built.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from fpdt_ext import runtime

_SHIMS_INSTALLED = False


class CPURNGStatesTracker:
    """megatron-core's CudaRNGStatesTracker interface over the CPU generator."""

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return self._initialized

    def reset(self):
        self._initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self._initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _cpu_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def prepare() -> None:
    """Call before megatron-core builds anything: with this process's tensors on the CPU
    (:func:`fpdt_ext.runtime.current`), install the shims; on a GPU, nothing."""
    if not runtime.current().on_gpu:
        install()


def install() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU (idempotent). Refused on a process
    that computes on a GPU: the shims would send its tensors to the CPU."""
    global _SHIMS_INSTALLED
    if _SHIMS_INSTALLED:
        return
    if runtime.current().on_gpu:
        raise RuntimeError("the CPU shims redirect megatron-core's CUDA device to the CPU; this process "
                           f"computes on {runtime.current().device}")
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # (1)
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()  # (2)
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    fused_softmax.get_default_causal_mask = _cpu_causal_mask  # (3) where the local core attention looks it up
    torch.cuda.synchronize = lambda device=None: None  # (4)
    _SHIMS_INSTALLED = True


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCPU(TorchFunctionMode):
    """Tensor factories asked for a CUDA device (a string, ``torch.device`` or an index) make CPU
    tensors, ``tensor.to(<cuda>)`` stays on the CPU and ``tensor.cuda()`` is the tensor;
    ``redirected`` counts those calls."""

    def __init__(self):
        super().__init__()
        self.redirected = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
            self.redirected += 1
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            self.redirected += 1
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
            self.redirected += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_tensors_on_cpu():
    """While it is open, ``torch.zeros(..., device="cuda")`` and the like make CPU tensors and
    ``tensor.cuda()`` changes nothing (for megatron-core's pipeline code on a machine without CUDA)."""
    if runtime.current().on_gpu:
        raise RuntimeError("cuda_tensors_on_cpu is for processes that compute on the CPU")
    with CudaToCPU():
        yield
