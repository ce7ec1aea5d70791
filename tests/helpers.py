"""What the test tiers share: the repository root, the tiny model's flags, launching entry points.

    tests/unit/         fast, one process: pure functions, modules, planner and benchmark arithmetic
    tests/distributed/  several local gloo processes against a single-process float64 reference
    tests/e2e/          pretrain_*.py under torchrun, the tools, the launch scripts, the GPU check
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from fpdt_ext.testing.spawn import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny Llama-shaped model (GQA) on mock data; tests add what they vary (FPDT, lengths, the LR schedule).
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
        "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "128", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--mock-data", "--vocab-size", "256", "--log-interval", "1", "--eval-iters", "0"]


def launcher(nproc: int, torchrun: Optional[bool] = None) -> List[str]:
    """How to start ``nproc`` processes of a script: torchrun on a free port (by default only for
    more than one; ``torchrun=True`` for one too, with the launcher's environment), else python."""
    if not (nproc > 1 if torchrun is None else torchrun):
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port())]


def run_script(nproc: int, script: str, args: Sequence[str], *, timeout: float = 900, expect_rc: int = 0,
               torchrun: Optional[bool] = None) -> subprocess.CompletedProcess:
    """Run ``script`` (relative to the repository root) on ``nproc`` processes; assert its exit code."""
    proc = subprocess.run([*launcher(nproc, torchrun), script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_pretrain(tmp_path, name: str, nproc: int, flags: Sequence[str], *, script: str = "pretrain_llama.py",
                 timeout: float = 900, expect_rc: int = 0, torchrun: Optional[bool] = None) -> Tuple[list, str]:
    """A training run: (the JSON lines it logged, one per logged iteration; its output)."""
    log = tmp_path / f"{name}.jsonl"
    proc = run_script(nproc, script, [*flags, "--loss-log-file", str(log)], timeout=timeout, expect_rc=expect_rc,
                      torchrun=torchrun)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return rows, proc.stdout + proc.stderr


def assert_no_worker_traceback(out: str) -> None:
    """torchrun itself ends with a traceback (ChildFailedError) when a worker exits non-zero; no
    worker may add one: a user error is one line."""
    assert out.count("Traceback (most recent call last)") <= 1 and "megatron/training" not in out, out


def write_initial_weights(rank: int, world_size: int, flags: Sequence[str], path: str) -> None:
    """A ``run_world`` worker: a weights-only checkpoint of the model the flags describe, built on
    the CPU path, so that runs initialised differently (the GPU path initialises on its device
    with the model-parallel RNG) start from the same weights."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import model_args_dict, write_checkpoint
    from megatron.training.initialize import initialize
    from megatron.training.models import build_model

    args = validate_args(parse_args(list(flags)), world_size=world_size)
    model = build_model(args, initialize(args), args.tokenizer.vocab_size)
    write_checkpoint(path, 0, {"model": model.sharded_state_dict(), "kind": "weights",
                               "model_args": model_args_dict(args), "true_vocab_size": args.tokenizer.vocab_size}, {})
