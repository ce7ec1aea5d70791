"""Parameters, gradients and optimizer state sharded over data x FPDT ranks: torch FSDP2.

``--use-torch-fsdp2`` (Megatron-LM's flag; DeepSpeed's ZeRO stage 2 and 3 map onto it, see
compat.py) wraps each transformer layer, then the whole model,
in torch's ``fully_shard`` over the data x FPDT group (megatron-core's dp_cp group: FPDT ranks
hold identical parameters, so they shard them too). Each rank keeps 1/N of every parameter and
gradient, and the optimizer (HostAdamW) keeps Adam state for that 1/N only. A layer's parameters
are all-gathered before its forward and again before its backward, and its gradients are
reduce-scattered (averaged, as DDP averages) when its backward ends.

:class:`ShardedModel` gives the training loop the calls it makes of megatron-core's DDP wrapper
(``module``, ``config``, ``zero_grad_buffer``, ``no_sync``), so the loop and megatron-core's
pipeline schedules are the same for both. With pipeline stages each model chunk is an FSDP2 root
of its own over its stage's data x FPDT ranks, and the tied embedding's gradient is summed
between the first and last stage shard by shard (:func:`sum_tied_embedding_grads`). Each micro
batch's gradients are reduce-scattered in its backward (``no_sync`` holds nothing back).

Checkpoints are the ones an unsharded run writes: megatron-core's ``sharded_state_dict`` gives
each rank's shards their place in the whole tensors (:func:`checkpoint_layout` fixes the one
place it does not), so a sharded checkpoint loads unsharded, at another size, and into the
Hugging Face converter, and the reverse.

With tensor parallelism each TP rank's parameters (its TP shards, plain tensors) are sharded
again over the data x FPDT ranks of that TP rank, as megatron-core's checkpoint offsets for
"TP + FSDP2" expect; the gradients megatron-core's finalisation sums over TP (the q/k norms,
which see only a rank's heads, and Megatron-SP's norms) are summed over TP by
:meth:`ShardedModel.finish_tp_grads` after the backward. Not yet: megatron-core's own
Megatron-FSDP (refused: its checkpoints are megatron-core's ``fsdp_dtensor`` format), parameters
whose first dimension the shard count does not divide (refused at start), SwiGLU with TP over an
odd number of data x FPDT ranks (a shard would straddle the gate and up halves; RunConfig
refuses it). Tested on the CPU (gloo); the GPU path (NCCL, a "cuda" device mesh) is untested on GPU.
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
                 reshard_after_forward: bool = True, tp_group=None):
        super().__init__()
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        size = torch.distributed.get_world_size(group)
        self.tp_group = tp_group if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1 else None
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
        self.config = model.config  # what megatron-core's schedules read (as from its DDP wrapper)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self):
        """Gradients are the parameters' own (set to None by the optimizer's zero_grad)."""

    def finish_tp_grads(self) -> None:
        """With TP: sum over the TP ranks the gradients megatron-core's finalize_model_grads sums
        there (the q/k norms' with --qk-layernorm, each rank normalising its heads; Megatron-SP's
        norms and biases with --sequence-parallel). Every TP rank holds the same FSDP shard of those
        replicated parameters, so this rank's shard is summed as it is."""
        if self.tp_group is None:
            return
        config = self.module.config
        grads = [local(p.grad) for name, p in self.module.named_parameters() if p.grad is not None and (
            (config.sequence_parallel and getattr(p, "sequence_parallel", False))
            or (config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)))]
        if grads:
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat, group=self.tp_group)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)

    @contextlib.contextmanager
    def no_sync(self):
        """Nothing: each micro batch's gradients are reduce-scattered in its backward and summed
        into the float32 shards, as megatron-core's FSDP2 wrapper does. Holding them back
        (FSDP2's ``set_requires_gradient_sync(False)``) would keep every layer's unsharded
        gradient, in float32, until the last micro batch: a whole copy of the model's gradients,
        the memory sharding exists to save."""
        yield


def sum_tied_embedding_grads(models, pp_group, embd_group) -> None:
    """Under a pipeline with tied embeddings: the first stage's embedding gradient and the last
    stage's output-layer copy summed, as megatron-core's ``finalize_model_grads`` sums them. Both
    stages shard the [vocab, hidden] weight alike over data x FPDT ranks of the same size, so the
    embedding group's ranks hold the same rows and their local shards are summed as they are
    (megatron-core gathers the whole gradient of a DTensor first)."""
    if pp_group is None or embd_group is None or torch.distributed.get_world_size(pp_group) == 1:
        return
    if torch.distributed.get_world_size(embd_group) == 1 or (
            torch.distributed.get_rank() not in torch.distributed.get_process_group_ranks(embd_group)):
        return
    module = (models[0] if torch.distributed.get_rank(pp_group) == 0 else models[-1]).module
    if not module.share_embeddings_and_output_weights:
        return
    weight = module.shared_embedding_or_output_weight()
    if weight is not None and weight.grad is not None:
        torch.distributed.all_reduce(local(weight.grad), group=embd_group)


def swiglu_fragment(rank: int, size: int, tp_rank: int = 0, tp_size: int = 1):
    """(index, count) of the row block of the whole SwiGLU ``fc1`` weight [gate; up] that FSDP rank
    ``rank`` of ``size`` holds on TP rank ``tp_rank``: FSDP shards the rows of the TP rank's
    [gate_t; up_t], so with an even ``size`` the first half of the ranks hold gate rows (block
    t x size/2 + r of the gate's) and the rest up rows; with TP 1 rank r holds block r."""
    if tp_size == 1:
        return rank, size
    half = size // 2
    if rank < half:
        return tp_rank * half + rank, tp_size * size
    return tp_size * half + tp_rank * half + rank - half, tp_size * size


def checkpoint_layout(sharded_state: dict, group, tp_group=None) -> dict:
    """megatron-core's ``sharded_state_dict()`` of an FSDP2-sharded model, fixed where it assumes
    its own sharding. Its SwiGLU ``fc1`` factory splits each rank's rows into a gate half and an up
    half, which holds for TP shards and not for FSDP's (rank r holds rows r/N .. (r+1)/N of the
    TP rank's [gate; up] rows): those become plain row shards of the same global tensor
    (:func:`swiglu_fragment`), so the checkpoint is the one an unsharded run writes and reads.
    Over one rank nothing is sharded and megatron-core's factory stays."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    rank, size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    tp_rank, tp_size = ((torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group))
                        if tp_group is not None else (0, 1))
    index, count = swiglu_fragment(rank, size, tp_rank, tp_size)

    def plain(item):
        if not isinstance(item, ShardedTensorFactory) or size == 1:
            return item
        built = item.build()[0]  # the stacked-layer axes megatron-core prepends, as the factory has them
        n = built.prepend_axis_num
        prepended = [(axis, built.global_offset[axis], built.axis_fragmentations[axis]) for axis in range(n)]
        return ShardedTensor.from_rank_offsets(item.key, item.data, *prepended, (n, index, count),
                                               replica_id=item.replica_id, prepend_axis_num=n)

    return dict_list_map_inplace(plain, sharded_state)


def main_replica_id(replica_id):
    """A ShardedTensor's replica id with its data x FPDT part (the last) 0: the copy a rank saves
    and loads as its own (a shard, or the part of a split it owns)."""
    return (*replica_id[:-1], 0) if isinstance(replica_id, tuple) else 0


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
