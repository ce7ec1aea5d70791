"""Process groups, device shims and seeds, in that order, before any model exists."""

from __future__ import annotations

import datetime
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from fpdt_ext import runtime
from fpdt_ext.mcore import cpu_shims
from fpdt_ext.mcore.parallel_state import ParallelGroups, initialize_fpdt_parallel


def initialize(args) -> ParallelGroups:
    runtime.init_distributed(timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    cpu_shims.prepare()
    if dist.get_world_size() != args.world_size:
        raise RuntimeError(f"arguments were validated for {args.world_size} processes but "
                           f"{dist.get_world_size()} are running")
    groups = initialize_fpdt_parallel(
        args.tensor_model_parallel_size,
        args.fpdt_parallel_size,
        args.pipeline_model_parallel_size,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    set_seed(args.seed, tp_rank=groups.tp_rank)
    return groups


def set_seed(seed: int, *, tp_rank: int) -> None:
    """Megatron's seeding: one default stream, plus a model-parallel stream offset by the TP rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
