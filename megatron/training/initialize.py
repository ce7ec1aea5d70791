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


def initialize(config) -> ParallelGroups:
    """For the run ``config`` (:class:`~megatron.training.config.RunConfig`): the process group and
    runtime, megatron-core's CPU shims where needed, the parallel groups, the seeds."""
    parallel = config.parallel
    runtime.init_distributed(timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes))
    cpu_shims.prepare()
    if dist.get_world_size() != parallel.world_size:
        raise RuntimeError(f"the run was configured for {parallel.world_size} processes but "
                           f"{dist.get_world_size()} are running")
    groups = initialize_fpdt_parallel(
        parallel.tensor_model_parallel_size,
        parallel.fpdt_parallel_size,
        parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        timeout_minutes=parallel.distributed_timeout_minutes,
    )
    set_seed(config.training.seed, tp_rank=groups.tp_rank, pp_rank=groups.pp_rank)
    return groups


def set_seed(seed: int, *, tp_rank: int, pp_rank: int = 0) -> None:
    """Megatron's seeding: one default stream, offset by 100 per pipeline stage (so the stages'
    layers differ), plus a model-parallel stream offset by the TP rank."""
    seed += 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
