"""Where a training step's memory goes: live tensors at each phase's peak, by where they were made.

    python bench/memory_census.py                          # FPDT, llama-tiny, 24576 tokens, 2 processes
    python bench/memory_census.py --kind baseline --seq 4096
    python bench/memory_census.py --kind fpdt-disk --seq 32768   # chunks and layer inputs on disk

A diagnostic, not a benchmark (it slows the step down many times). One warm-up
step, then one step under a ``TorchDispatchMode`` that records every tensor an
operator creates (not views or in-place results) with its size and the
project / megatron-core call site that made it, and drops it when the tensor
is freed. For each phase of the step (forward; loss backward, from the first
operator in ``fpdt_ext/loss.py``; layer backward, from the first one in FPDT's
attention, QKV or MLP code after that) it prints the live tensors at the
phase's peak, grouped by call site, in units of one ``[s/P, h]`` tensor of
the activation dtype. Tensors that existed before the step (parameters,
gradient buffers, optimizer state) are not counted; nor is memory that is not
a tensor (communication buffers, allocator slack), which ``bench/max_seq.py``
sees and this does not.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.train_step import MODEL, setup_config  # noqa: E402
from fpdt_ext.runtime import Runtime  # noqa: E402

_OURS = ("/fpdt_ext/", "/megatron/", "/bench/train_step.py")
_LAYER_CODE = ("attention.py", "qkv.py", "mlp.py")


class TensorCensus(TorchDispatchMode):
    """Live tensors made by operators, and a snapshot of them at each phase's peak."""

    MIN_BYTES = 1 << 16  # smaller tensors are noise here

    def __init__(self):
        super().__init__()
        self.live = {}  # storage pointer -> (bytes, call site)
        self.total = 0
        self.phase = "forward"
        self.peaks = {}  # phase -> (bytes, {storage pointer: (bytes, call site)})

    @staticmethod
    def _site(op) -> str:
        frames = [f for f in traceback.extract_stack()[:-3]
                  if any(part in f.filename for part in _OURS) and __file__ not in f.filename]
        where = " < ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                           for f in reversed(frames[-2:]))
        return f"{op.__name__.split('.')[0]} @ {where}"

    def _advance_phase(self, site: str) -> None:
        if self.phase == "forward" and "loss.py" in site:
            self.phase = "loss backward"
        elif self.phase == "loss backward" and any(name in site for name in _LAYER_CODE):
            self.phase = "layer backward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            nbytes, key = t.untyped_storage().nbytes(), t.untyped_storage().data_ptr()
            if nbytes < self.MIN_BYTES or key in self.live:
                continue
            site = self._site(func)
            self._advance_phase(site)
            self.live[key] = (nbytes, site)
            self.total += nbytes
            weakref.finalize(t, self._freed, key)
            if self.total > self.peaks.get(self.phase, (0,))[0]:
                self.peaks[self.phase] = (self.total, dict(self.live))
        return out

    def _freed(self, key) -> None:
        nbytes, _ = self.live.pop(key, (0, None))
        self.total -= nbytes

    def report(self, top: int = 25) -> dict:
        result = {}
        for phase, (peak, snapshot) in self.peaks.items():
            by_site = collections.Counter()
            for nbytes, site in snapshot.values():
                by_site[site] += nbytes
            result[phase] = {"peak_bytes": peak, "by_site": by_site.most_common(top)}
        return result


def census_worker(rank, world_size, config):
    from megatron.training.training import Trainer

    trainer = Trainer(config)
    trainer.train_step()  # warm-up: optimizer state, pools
    census = TensorCensus()
    with census:
        trainer.train_step()
    return census.report()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("fpdt", "fpdt-disk", "baseline"), default="fpdt")
    p.add_argument("--offload-dir", default=None, help="fpdt-disk's directory (default: a fresh temp dir)")
    p.add_argument("--model", choices=sorted(MODEL), default="llama-tiny")
    p.add_argument("--seq", type=int, default=24576)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--min-units", type=float, default=0.2, help="hide call sites below this many units")
    a = p.parse_args(argv)
    if Runtime.detect().on_gpu:
        p.error("the census counts CPU tensors; on CUDA use torch.cuda.memory._record_memory_history")
    from fpdt_ext.testing.spawn import run_world

    offload_dir = a.offload_dir
    if a.kind == "fpdt-disk" and offload_dir is None:
        from bench.max_seq import default_offload_dir

        offload_dir = default_offload_dir()
    config = setup_config(a.kind, a.model, a.seq, a.nproc, a.chunk_size, False, False, offload_dir)
    report = run_world(a.nproc, census_worker, config, timeout=7200, start_method="spawn")[0]
    hidden = config.model.hidden_size
    local = a.seq // (a.nproc if a.kind != "baseline" else 1)
    unit = local * hidden * 4
    print(f"# {a.kind}, {a.model}, {a.seq} tokens, {a.nproc} processes (rank 0); "
          f"unit = one [{local}, {hidden}] float32 tensor = {unit / 2**20:.1f} MiB")
    for phase, r in report.items():
        print(f"{phase}: peak {r['peak_bytes'] / 2**20:.1f} MiB = {r['peak_bytes'] / unit:.1f} units")
        for site, nbytes in r["by_site"]:
            if nbytes / unit >= a.min_units:
                print(f"  {nbytes / unit:6.2f}  {site}")
    return report


if __name__ == "__main__":
    main()
