"""megatron-core's Megatron-FSDP behind Megatron-LM's flags (the GPU path).

``--use-megatron-fsdp --data-parallel-sharding-strategy S`` wraps the model in megatron-core's
``FullyShardedDataParallel`` over the data x FPDT ranks (megatron-core's dp_cp group: FPDT ranks
hold identical parameters, so they shard them too) and trains it with megatron-core's distributed
optimizer, as Megatron-LM does. ``S`` is Megatron-FSDP's: ``optim`` shards the optimizer state
and float32 master weights (ZeRO-1), ``optim_grads`` the gradients too (ZeRO-2),
``optim_grads_params`` the parameters too, each transformer layer gathered for its forward and
again for its backward (ZeRO-3). Gradients are reduced in float32.

Megatron-FSDP needs CUDA streams and events, so on the CPU the same flags run this project's
implementations of the same sharding (``ParallelConfig.cpu_equivalent``): the distributed
optimizer for ``optim``, FSDP2 (sharding.py) for the other two.

Checkpoints: Megatron-LM writes Megatron-FSDP's ``fsdp_dtensor`` format; here a Megatron-FSDP run
writes the ``torch_dist`` checkpoint every run writes. Each rank's shard of a parameter is a block
of whole rows of it, of uneven size, so it is saved as a ShardedTensor at its row offset without a
regular grid (megatron-core leaves those to torch DCP, which reshards by overlap). The optimizer
state (Adam moments, float32 master weights with bf16) is saved in HostAdamW's layout, keyed by
the parameters, from torch's AdamW or, with TransformerEngine or apex installed, their FusedAdam
(whose step count is per parameter group). So a Megatron-FSDP checkpoint resumes exactly, loads
unsharded or at another size (optimizer state included, on the CPU path too), and into the
Hugging Face converter.

With TP, megatron-core's mesh is data x context x TP: each TP rank's slice of a parameter is
sharded over its data x FPDT ranks, and its row blocks are saved at megatron-core's TP offsets.
Pipeline stages are refused (ParallelConfig): megatron-core 0.16's mesh has no pipeline axis (use
--use-torch-fsdp2). ``no_shard`` is plain data parallelism: megatron-core's DDP. Tested on the
CPU under the CUDA-path harness (tests/cuda_on_cpu.py, gloo standing in for NCCL); untested on GPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from megatron.training.sharding import local, main_replica_id


def wrap(chunks, strategy: str, groups, device) -> list:
    """Each model chunk in megatron-core's ``FullyShardedDataParallel`` over the data x FPDT ranks."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.fsdp import FullyShardedDataParallel

    ddp_config = DistributedDataParallelConfig(
        use_megatron_fsdp=True, data_parallel_sharding_strategy=strategy, use_distributed_optimizer=True,
        # with sharded gradients each bucket is reduce-scattered as its backward ends; with optim the whole
        # gradient buffer is reduce-scattered in finish_grad_sync (megatron-core 0.16's overlapped path adds
        # the local gradient to its own reduction when the gradients are not sharded)
        grad_reduce_in_fp32=True, overlap_grad_reduce=strategy != "optim", overlap_param_gather=True,
        # the average as a multiply before a sum: NCCL's PREMUL_SUM fusion is NCCL's alone
        average_in_collective=False, gradient_reduce_div_fusion=False)
    with _te_linear_type(), _random_state_kept():
        wrappers = [FullyShardedDataParallel(chunk.config, ddp_config, chunk, device=device,
                                             pg_collection=groups.pg_collection) for chunk in chunks]
    for wrapper in wrappers:
        wrapper.forward = functools.partial(_forward_with_root_hook, wrapper, wrapper.forward)
    if strategy == "optim":
        for wrapper in wrappers:
            # Megatron-FSDP's no_sync() marks the next micro batch the last, and the gradient hooks of a
            # last micro batch take the overlapped path above: the buffer is reduced in finish_grad_sync only
            wrapper.no_sync = contextlib.nullcontext
    return wrappers


@contextlib.contextmanager
def _te_linear_type():
    """megatron-core 0.16's adapter asks ``isinstance(module, TELinear)`` of every module holding a
    TP parameter (a TE layer outside TP is TP-duplicated). Without TransformerEngine its
    ``TELinear`` is a MagicMock, not a type, and the question raises; with TE installed it is
    False for this project's layers (megatron-core's own linear layers, whose
    ``tensor_model_parallel`` marks Megatron-FSDP reads). So while the wrapper is built, a type
    nothing is an instance of stands in for it: the answer TE would give."""
    from megatron.core.distributed.fsdp import mcore_fsdp_adapter

    if isinstance(mcore_fsdp_adapter.TELinear, type):
        yield
        return

    class NoTransformerEngineLinear:
        pass

    saved, mcore_fsdp_adapter.TELinear = mcore_fsdp_adapter.TELinear, NoTransformerEngineLinear
    try:
        yield
    finally:
        mcore_fsdp_adapter.TELinear = saved


@contextlib.contextmanager
def _random_state_kept():
    """Every random state as it was before: megatron-core 0.16's wrapper, with TP, gives every
    TP rank TP rank 0's states, the model-parallel RNG tracker's among them, so TP ranks would draw
    the same dropout masks for their different attention heads (Megatron seeds that tracker per TP
    rank; the unsharded run keeps it so)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), tracker.get_states(),
             torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        tracker.set_states(saved[3])
        if saved[4] is not None:
            torch.cuda.set_rng_state(saved[4])


def _forward_with_root_hook(wrapper, forward, *args, **kwargs):
    """The wrapper's forward, then the forward hook Megatron-FSDP put on the root module (the
    GPTModel) for the start of its backward: it marks every gradient still to be reduced and
    queues the end-of-backward reduction (the tied embedding's among them) and the reset of its
    bucket bookkeeping. MegatronFSDP.forward calls the root's ``forward`` itself, so the root's
    hooks never run; megatron-core 0.16 registers the hook a second time on the model's last
    submodule, the output layer, which FPDT's chunked loss does not call. Without it each micro
    batch after the first reduces every bucket again."""
    output = forward(*args, **kwargs)
    fsdp = wrapper.module
    handle = fsdp.backward_pre_hooks.get(" _root_pre_backward")  # the root's: named "" by named_modules()
    hook = fsdp.module._forward_hooks.get(handle.id) if handle is not None else None
    if hook is None or not torch.is_grad_enabled():
        return output
    replaced = hook(fsdp.module, args, output)
    return output if replaced is None else replaced


def is_wrapped(model) -> bool:
    from megatron.core.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _sharded_params(wrapper) -> dict:
    """{name: DTensor} of the chunk's parameters as the optimizer holds them (this rank's rows of
    each float32 master weight). Megatron-FSDP swaps the modules' parameters between these and the
    gathered compute weights; the sharded ones are where a step's result lives."""
    fsdp = wrapper.module
    fsdp._replace_param_with_distributed_if_needed()  # (what its own state_dict pre-hook calls)
    return dict(fsdp.module.named_parameters())


def _row_layout(params: dict, group) -> tuple:
    """({name: this rank's first row}, {name: the TP-local whole shape}) of the sharded
    parameters: the ranks' row blocks in rank order over the data x FPDT group. (A DTensor's own
    shape is the whole tensor over TP as well.)"""
    rows = {name: local(p).shape[0] if p.dim() else 0 for name, p in params.items()}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, rows, group=group)
    me = dist.get_rank(group)
    offsets = {name: sum(other[name] for other in everyone[:me]) for name in params}
    shapes = {name: (sum(other[name] for other in everyone), *local(p).shape[1:]) if p.dim() else ()
              for name, p in params.items()}
    return offsets, shapes


@contextlib.contextmanager
def _whole_shapes_on_meta(module, shapes: dict):
    """The module's parameters replaced by meta tensors of their TP-local whole shapes (``shapes``
    by parameter name; tied ones stay tied), then put back: megatron-core's
    ``sharded_state_dict`` derives each tensor's place from its local shape, which for a row block
    (or none) is not the TP-local whole it expects."""
    names = {id(p): name for name, p in module.named_parameters()}
    saved, meta = [], {}
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is not None:
                if id(param) not in meta:
                    shape = shapes[names[id(param)]]
                    meta[id(param)] = torch.nn.Parameter(torch.empty(shape, dtype=param.dtype, device="meta"),
                                                         requires_grad=param.requires_grad)
                    meta[id(param)].__dict__.update(vars(param))  # megatron-core's marks (tensor_model_parallel, ...)
                saved.append((mod, name, param))
                mod._parameters[name] = meta[id(param)]
    try:
        yield
    finally:
        for mod, name, param in saved:
            mod._parameters[name] = param


def _pieces(whole, first: int, rows: int) -> list:
    """Where rows ``first .. first + rows`` of a TP-local parameter go in the saved tensors:
    [(first local row, rows, ShardedTensor of the whole TP-local tensor)]. ``whole`` is what
    megatron-core's ``sharded_state_dict`` gives for the TP-local tensor: one ShardedTensor, or a
    SwiGLU ``fc1`` factory, whose TP-local [gate_t; up_t] rows go to two places (gate and up)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    parts = whole.build() if isinstance(whole, ShardedTensorFactory) else [whole]
    out, start = [], 0
    for part in parts:
        height = part.local_shape[0]
        lo, hi = max(first, start), min(first + rows, start + height)
        if lo < hi:
            out.append((lo - first, hi - lo, part, lo - start))
        start += height
    return out


def _row_block_factory(key, data, whole, first: int):
    """A factory for this rank's row block ``data`` of a parameter (or an optimizer tensor shaped
    like it): one ShardedTensor per piece (:func:`_pieces`) at its rows' place in the whole tensor,
    the stacked-layer axes megatron-core prepends given as axes of size 1 of the data (its uneven
    sharding path reads no prepended axes; on disk the tensors are the regular path's)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    pieces = _pieces(whole, first, data.shape[0])
    prepend = pieces[0][2].prepend_axis_num  # (the same for every piece)

    def build(key, data, replica_id, flattened_range):
        built = []
        for at, rows, part, offset in pieces:
            block = data.narrow(0, at, rows)
            shape = (1,) * prepend + tuple(block.shape)
            global_offset = list(part.global_offset)
            global_offset[prepend] += offset
            built.append(ShardedTensor(
                key=key, data=block.view(shape), dtype=block.dtype, local_shape=shape,
                global_shape=tuple(part.global_shape), global_offset=tuple(global_offset), axis_fragmentations=None,
                replica_id=main_replica_id(part.replica_id), prepend_axis_num=0,  # every rank's rows its own
                allow_shape_mismatch=part.allow_shape_mismatch))
        return built

    def merge(loaded):
        return torch.cat([t.reshape(-1, *t.shape[prepend + 1:]) for t in loaded])

    return ShardedTensorFactory(key, data, build, merge, replica_id=0)


def model_sharded_state(wrapper, group) -> dict:
    """The chunk's ``sharded_state_dict()`` (megatron-core's keys, layer and TP offsets and replica
    ids) with each sharded parameter saved as this rank's row block of its TP-local tensor, at the
    block's place in the whole tensor; ranks holding no rows of a parameter give nothing for it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    params = _sharded_params(wrapper)
    offsets, shapes = _row_layout(params, group)
    module = wrapper.module.module
    with _whole_shapes_on_meta(module, shapes):
        whole = module.sharded_state_dict()
    state = {}
    for key, item in whole.items():
        if key not in params or not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            state[key] = item
            continue
        data = local(params[key])
        if data.numel():
            state[key] = _row_block_factory(item.key, data, item, offsets[key])
    return state


def load_model_state(wrapper, state: dict) -> None:
    """This rank's rows (:func:`model_sharded_state`) into the sharded parameters, then the
    compute weights refreshed from them (Megatron-FSDP's own load hook does the same)."""
    params = _sharded_params(wrapper)
    with torch.no_grad():
        for name, param in params.items():
            if name in state:
                local(param).copy_(state[name].view(local(param).shape))
    wrapper.module.install_optimized_model_weights()


def _step_per_parameter(optimizer) -> bool:
    """torch's Adam and AdamW count steps per parameter; FusedAdam per parameter group."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _adam_layout(optimizer) -> bool:
    """Whether ``optimizer`` keeps Adam's state as the checkpoints here read it: torch's Adam or
    AdamW, or TransformerEngine's or apex's FusedAdam with float32 moments and no master weights
    of its own (megatron-core's default; its precision-aware optimizer is not offered here)."""
    if _step_per_parameter(optimizer):
        return True
    # (megatron-core builds one of these three: TransformerEngine's, else apex's, else torch's)
    return type(optimizer).__name__ == "FusedAdam" and not getattr(optimizer, "master_weights", False) and all(
        getattr(optimizer, f"{name}_dtype", torch.float32) == torch.float32 for name in ("exp_avg", "exp_avg_sq"))


class MegatronFSDPOptimizer:
    """megatron-core's distributed optimizer over Megatron-FSDP's sharded parameters, with the
    training loop's and checkpoints' calls (HostAdamW's): ``step``, ``zero_grad``,
    ``param_groups`` and the rest go to megatron-core's; its state is saved and loaded in
    HostAdamW's layout (megatron-core writes it only as ``fsdp_dtensor``).

    megatron-core steps with torch's AdamW, or with TransformerEngine's or apex's FusedAdam when
    one is installed. Both keep Adam's moments per parameter (``exp_avg``, ``exp_avg_sq``);
    torch's step count is per parameter too, FusedAdam's per parameter group. Either is read and
    written here. (A FusedAdam holding its own master weights or moments below float32,
    TransformerEngine's precision-aware mode, is refused: this project never asks for it.)"""

    state_layout = "HostAdamW"  # its checkpoints' optimizer layout is HostAdamW's (checkpointing.optimizer_format)

    def __init__(self, optimizer, wrappers, params_dtype):
        self._optimizer = optimizer
        self._wrappers = wrappers
        self._keep_masters = params_dtype != torch.float32  # as HostAdamW: masters kept apart from bf16
        others = sorted({type(o).__name__ for o in self.inner_optimizers() if not _adam_layout(o)})
        if others:
            raise ValueError(f"--use-megatron-fsdp: megatron-core built its optimizer on {', '.join(others)}, whose "
                             f"state this project's Megatron-FSDP checkpoints do not read (torch's AdamW and "
                             f"TransformerEngine's or apex's FusedAdam with float32 state they do); use "
                             f"--use-torch-fsdp2")

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    @property
    def param_groups(self):
        return self._optimizer.param_groups

    def inner_optimizers(self) -> list:
        """The torch optimizers megatron-core steps (one per chained optimizer)."""
        return [opt.optimizer for opt in getattr(self._optimizer, "chained_optimizers", [self._optimizer])]

    def _params(self) -> list:
        return [p for inner in self.inner_optimizers() for g in inner.param_groups for p in g["params"]]

    def _groups(self):
        """(inner optimizer, parameter group) pairs."""
        return [(inner, group) for inner in self.inner_optimizers() for group in inner.param_groups]

    def _prime(self) -> None:
        """Before the first step no state exists yet: zero moments (and torch's step), as either
        optimizer creates them at its first step, so a checkpoint has tensors to save or fill."""
        from megatron.training.optimizer import prime_adam_state

        for inner, group in self._groups():
            if _step_per_parameter(inner):
                prime_adam_state(inner)
                continue
            for p in group["params"]:  # FusedAdam: the moments (its step is the group's)
                if not inner.state[p]:
                    inner.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        """Adam moments and float32 master weights as tensors sharded like the model's parameters
        (HostAdamW's keys); the step is common. ``metadata`` changes nothing here."""
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        names = {id(p): name for wrapper in self._wrappers for name, p in _sharded_params(wrapper).items()}
        self._prime()
        state, masters, steps, i = {}, {}, set(), -1
        for inner, group in self._groups():
            for param in group["params"]:
                i += 1  # (the index in _params())
                sharded = model_sharded_state_dict.get(names.get(id(param)))
                if sharded is None:  # no rows of it on this rank
                    continue

                def like_model(tensor, prefix):
                    return make_sharded_optimizer_tensor(sharded, local(tensor), prefix)

                entry = inner.state[param]
                steps.add(float(entry["step"] if _step_per_parameter(inner) else group.get("step", 0)))
                state[i] = {k: like_model(entry[k], f"optimizer.state.{k}") for k in ("exp_avg", "exp_avg_sq")}
                if self._keep_masters:
                    masters[i] = like_model(param, "optimizer.master")
        # no parameter groups: a loader uses its own (HostAdamW's too), and a list of another length
        # would not merge with a loader's
        return {"adam": {"state": state}, "step": max(steps, default=0.0), "master": masters}

    def load_state_dict(self, state):
        """Moments, masters and step into the primed state (this run's own parameter groups: the
        LR scheduler sets their learning rate and weight decay)."""
        owners = {id(p): inner for inner, group in self._groups() for p in group["params"]}
        params = self._params()
        with torch.no_grad():
            for inner, group in self._groups():
                if not _step_per_parameter(inner):
                    group["step"] = int(state["step"])  # FusedAdam's (an int unless capturable)
            for i, entry in state["adam"]["state"].items():
                param = params[i]
                inner = owners[id(param)]
                target = inner.state[param]
                for key, value in entry.items():
                    local(target[key]).copy_(value.view(local(target[key]).shape))
                if _step_per_parameter(inner):
                    target["step"] = torch.tensor(float(state["step"]), dtype=target["step"].dtype,
                                                  device=target["step"].device)
                if i in state["master"]:
                    local(param).copy_(state["master"][i].view(local(param).shape))
        for wrapper in self._wrappers:
            wrapper.module.install_optimized_model_weights()

    def reload_model_params(self):
        """Nothing: the sharded parameters are the float32 master weights, loaded as they are."""
