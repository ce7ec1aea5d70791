"""Run a function on N local processes and collect what each returns.

Used by the multi-process tests and the benchmarks. Each process initialises
the process group as a training run does (:func:`fpdt_ext.runtime.init_distributed`):
gloo on the CPU; on a GPU machine rank r computes on GPU r modulo the GPU count
with the device-mapped backend (CUDA tensors over NCCL, which needs one GPU per
rank; CPU tensors over gloo). ``backend=`` overrides it.

A gloo collective that never matches waits forever, so every process group
gets a timeout and the parent gives up after ``timeout`` seconds.

Processes start as :data:`START_METHOD` says: ``"spawn"`` (a fresh interpreter
each; the benchmarks always ask for it) or ``"forkserver"``, which the test suite
uses (tests/conftest.py): one server process imports torch, megatron-core and
this project once (:data:`PRELOAD`; no computation, so no thread pool or device
state to inherit) and forks each rank from it, saving the few seconds of imports
per process that dominate a short test. Either way a rank starts with the
parent's current environment variables and working directory.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Optional

import torch
import torch.distributed as dist

from fpdt_ext import runtime

COLLECTIVE_TIMEOUT_S = 120  # gloo waits forever on a mismatched collective otherwise
START_METHOD = "spawn"
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.training.training"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, results, env, cwd):
    try:
        if os.environ != env:  # (a forked rank has the server's, from when it started)
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        runtime.init_distributed(rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                                 timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), backend=backend,
                                 local_rank=rank)
        value = fn(rank, world_size, *args)
        # Plain pickle keeps tensor data in-band (the multiprocessing pickler would pass
        # shared-memory handles that die with this process).
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report, never hang the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size: int, fn, *args, timeout: float = 600, backend: Optional[str] = None,
              start_method: Optional[str] = None):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the values by rank.
    ``start_method``: :data:`START_METHOD` unless given (a memory benchmark gives "spawn": a
    forked rank's resident set counts the pages of every module the server imported)."""
    start_method = start_method or START_METHOD
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # (read when the server starts: the first run)
    results = ctx.Queue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results, env, cwd))
             for r in range(world_size)]
    for p in procs:
        p.start()
    values, errors, reported = {}, [], set()
    deadline = time.monotonic() + timeout
    try:
        while len(reported) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                # A process that died before reporting (killed, crashed in start-up) never will.
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
                if dead:
                    time.sleep(1.0)  # its report may still be in the pipe
                    if results.empty():
                        errors.append(f"rank(s) {dead} exited (exit codes "
                                      f"{[procs[r].exitcode for r in dead]}) without reporting")
                        break
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s waiting for "
                                  f"{world_size - len(reported)} rank(s)")
                    break
                continue
            reported.add(rank)
            if ok:
                values[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    return [values[r] for r in range(world_size)]
