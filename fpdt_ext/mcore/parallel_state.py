"""The FPDT sequence-parallel group next to megatron-core's tensor, pipeline and
data-parallel groups.

The world is TP x FPDT x PP x DP. The FPDT group occupies megatron-core's
context-parallel axis (``context_parallel_size``), so megatron-core's gradient
reduction over data x context ranks, its data-parallel rank (which picks the
samples) and its checkpoint sharding already do the right thing; FPDT owns
what runs on that axis. Rank order is megatron-core's default
"tp-cp-ep-dp-pp": TP ranks are adjacent, then FPDT ranks.

Everything downstream takes the groups from the :class:`ParallelGroups` this
module returns; FPDT code never calls megatron's global getters itself. The
groups inherit the world's backend (:mod:`fpdt_ext.runtime`: ``cpu:gloo,cuda:nccl``
on GPUs), so each of them takes both CPU and CUDA tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the four axes; validated on construction."""

    world_size: int
    tensor_model_parallel_size: int = 1
    fpdt_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    def __post_init__(self):
        for name in ("world_size", "tensor_model_parallel_size", "fpdt_parallel_size",
                     "pipeline_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        model = self.model_parallel_size
        if self.world_size % model:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x fpdt_parallel_size ({self.fpdt_parallel_size}) x "
                f"pipeline_model_parallel_size ({self.pipeline_model_parallel_size}) = {model}; "
                f"launch a multiple of {model} processes or change the parallel sizes"
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.fpdt_parallel_size * self.pipeline_model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.model_parallel_size


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    """The process groups of this rank and its coordinates on each axis."""

    layout: ParallelLayout
    tp: Any  # tensor parallel
    sp: Any  # FPDT sequence parallel (megatron-core's context-parallel axis)
    pp: Any  # pipeline parallel
    dp: Any  # data parallel (picks the samples)
    dp_sp: Any  # data x FPDT: gradients are reduced over this group
    pg_collection: Any  # megatron-core's ProcessGroupCollection, for building models

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def sp_rank(self) -> int:
        return dist.get_rank(self.sp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)


def initialize_fpdt_parallel(
    tensor_model_parallel_size: int = 1,
    fpdt_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    virtual_pipeline_model_parallel_size=None,
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Create every group (the process group must be initialised) and return them;
    ``virtual_pipeline_model_parallel_size``: model chunks per pipeline rank (interleaved schedule)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        raise RuntimeError("call fpdt_ext.runtime.init_distributed() (or torch.distributed.init_process_group) first")
    layout = ParallelLayout(
        world_size=dist.get_world_size(),
        tensor_model_parallel_size=tensor_model_parallel_size,
        fpdt_parallel_size=fpdt_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=fpdt_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelGroups(layout=layout, tp=pgs.tp, sp=pgs.cp, pp=pgs.pp, dp=pgs.dp, dp_sp=pgs.dp_cp,
                          pg_collection=pgs)
