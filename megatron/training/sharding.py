"""Parameters, gradients and optimizer state sharded over data x FPDT ranks: torch FSDP2.

``--use-torch-fsdp2`` (Megatron-LM's flag; DeepSpeed's ZeRO stage 2 and 3 map onto it, see
compat.py) wraps each transformer layer, then the whole model,
in torch's ``fully_shard`` over the data x FPDT group (megatron-core's dp_cp group: FPDT ranks
hold identical parameters, so they shard them too). Each rank keeps 1/N of every parameter and
gradient, and the optimizer (HostAdamW) keeps Adam state for that 1/N only. A layer's parameters
are all-gathered before its forward and again before its backward, and its gradients are
reduce-scattered (averaged, as DDP averages) when its backward ends.

:class:`ShardedModel` gives the training loop the calls it makes of megatron-core's DDP wrapper
(``module``, ``zero_grad_buffer``, ``no_sync``), so the loop is the same for both.

Checkpoints are the ones an unsharded run writes: megatron-core's ``sharded_state_dict`` gives
each rank's shards their place in the whole tensors (:func:`checkpoint_layout` fixes the one
place it does not), so a sharded checkpoint loads unsharded, at another size, and into the
Hugging Face converter, and the reverse. Not yet: tensor parallelism with FSDP2 (refused),
megatron-core's own Megatron-FSDP (it needs CUDA throughout; refused), parameters whose first
dimension the shard count does not divide (refused at start). Tested on the CPU (gloo); the GPU
path (NCCL, a "cuda" device mesh) is untested on GPU.
"""

from __future__ import annotations

import contextlib

import torch


def _decoder_layers(model):
    decoder = getattr(model, "decoder", None)
    return list(getattr(decoder, "layers", []))


class ShardedModel(torch.nn.Module):
    """``model`` sharded by FSDP2 over ``group`` (each transformer layer a unit, the rest the root's).

    With ``compute_dtype`` (bf16/fp16 runs) the shards are kept in float32, which makes them the
    optimizer's master weights (no second copy), each unit is cast to ``compute_dtype`` when it is
    gathered, and gradients are reduce-scattered in float32, as Megatron reduces them.
    ``reshard_after_forward``: False keeps each layer gathered from its forward to its backward
    (ZeRO-2's traffic: one gather per step), True gathers it again for the backward (ZeRO-3)."""

    def __init__(self, model: torch.nn.Module, group, device_type: str, *, compute_dtype=None,
                 reshard_after_forward: bool = True):
        super().__init__()
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        size = torch.distributed.get_world_size(group)
        uneven = [f"{name} {tuple(p.shape)}" for name, p in model.named_parameters() if p.shape[0] % size]
        if uneven:  # FSDP2 would pad them, and the checkpoints' layout assumes equal shards
            raise ValueError(f"--use-torch-fsdp2 over {size} data x FPDT ranks needs every parameter's first "
                             f"dimension divisible by {size}; not so: {', '.join(uneven[:4])}"
                             f"{' ...' if len(uneven) > 4 else ''}: shard over a divisor of those sizes (data x "
                             f"FPDT ranks) or change the model's sizes")
        attributes = {name: dict(vars(p)) for name, p in model.named_parameters()}  # megatron-core's marks
        if compute_dtype is not None and compute_dtype != torch.float32:
            model.float()
            policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        mesh = DeviceMesh.from_group(group, device_type)
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        for name, p in model.named_parameters():  # the sharded parameters are new objects
            for key, value in attributes.get(name, {}).items():
                if not hasattr(p, key):
                    setattr(p, key, value)
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self):
        """Gradients are the parameters' own (set to None by the optimizer's zero_grad)."""

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients accumulate unreduced (micro batches before the last)."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def checkpoint_layout(sharded_state: dict, group) -> dict:
    """megatron-core's ``sharded_state_dict()`` of an FSDP2-sharded model, fixed where it assumes
    its own sharding. Its SwiGLU ``fc1`` factory splits each rank's rows into a gate half and an up
    half, which holds for TP shards and not for FSDP's (rank r holds rows r/N .. (r+1)/N of the
    whole [gate; up] matrix): those become plain row shards of the same global tensor, so the
    checkpoint is the one an unsharded run writes and reads. (TP > 1 is refused with FSDP2.)"""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    rank, size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)

    def plain(item):
        if not isinstance(item, ShardedTensorFactory):
            return item
        built = item.build()[0]  # the stacked-layer axes megatron-core prepends, as the factory has them
        n = built.prepend_axis_num
        prepended = [(axis, built.global_offset[axis], built.axis_fragmentations[axis]) for axis in range(n)]
        return ShardedTensor.from_rank_offsets(item.key, item.data, *prepended, (n, rank, size),
                                               replica_id=item.replica_id, prepend_axis_num=n)

    return dict_list_map_inplace(plain, sharded_state)


def local(tensor):
    """This rank's shard of a DTensor, the very tensor it holds (megatron-core's sharded_state_dict
    keeps that one, and checkpoints match optimizer state to it by identity); a plain tensor as it is."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def like(sharded, local_tensor):
    """``local_tensor`` (this rank's shard) as a DTensor laid out as ``sharded``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor.to(sharded.dtype), sharded.device_mesh, sharded.placements,
                              shape=sharded.shape, stride=sharded.stride())
