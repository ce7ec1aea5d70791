"""megatron-core on a machine without CUDA: the few places it assumes CUDA.

megatron-core 0.16 runs its GPT model, DDP wrapper, recompute and distributed
checkpointing on the CPU once four assumptions are redirected; :func:`install`
does exactly that and nothing else, and only when CUDA is unavailable (it is a
no-op on GPUs):

1. Device lookups. Layers, buffers and the rotary embedding ask
   ``torch.cuda.current_device()`` where to allocate; here the answer is "cpu".
2. The RNG tracker. Megatron keeps named CUDA generator states (the
   model-parallel and data-parallel streams) and saves/restores "the CUDA RNG
   state" around activation recompute. A CPU tracker with the same named
   streams stands in, and the CUDA state getters/setters use the CPU
   generator, so recompute replays dropout masks exactly.
3. Mask helpers. The default causal mask of megatron-core's local core
   attention is built on "cuda"; here it is built on the CPU.
4. Synchronisation. dist_checkpointing calls ``torch.cuda.synchronize()``
   after copying tensors to host memory; on the CPU there is nothing to wait
   for, so it returns at once.
"""

from __future__ import annotations

import contextlib

import torch

_INSTALLED = False


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


def install() -> bool:
    """Redirect megatron-core's CUDA assumptions to the CPU when CUDA is absent.

    Returns True when the shims are active. Idempotent.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.fusions import fused_softmax

    torch.cuda.current_device = lambda: "cpu"  # (1)
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()  # (2)
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    fused_softmax.get_default_causal_mask = _cpu_causal_mask  # (3) where the local core attention looks it up
    torch.cuda.synchronize = lambda device=None: None  # (4)
    _INSTALLED = True
    return True
