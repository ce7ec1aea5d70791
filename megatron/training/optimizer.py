"""Optimizer and learning-rate schedule.

On GPU: megatron-core's optimizer (``get_megatron_optimizer``: fp32 master
weights for bf16/fp16, clipping, optional distributed optimizer). Its
wrappers insist on CUDA tensors, so on the CPU :class:`HostAdamW` is the honest
torch equivalent: fp32 master weights, gradients from megatron-core's DDP
buffer (``main_grad``), a global gradient norm that counts tensor-parallel
shards once, clipping, and ``torch.optim.AdamW``; with
``--use-distributed-optimizer`` its state is split over the data x FPDT ranks
(ZeRO-1, the group megatron-core's distributed optimizer uses). Both expose what the training
loop uses: ``step() -> (ok, grad_norm, num_zeros)``, ``zero_grad()``,
``param_groups``, ``sharded_state_dict()``/``load_state_dict()``, and
``reload_model_params()`` (master weights from the model, after a weights-only load).

Weight decay is not applied to biases and norm weights (1-D parameters), as in
Megatron. The schedule is megatron-core's ``OptimizerParamScheduler`` with the lengths of
``RunConfig.lr_schedule``: stepped once per iteration (sample- and token-based lengths in
iterations), or by each iteration's global batch in samples with a batch ramp-up.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from fpdt_ext import runtime
from megatron.training.sharding import is_sharded, like, local, main_replica_id


def _param_groups(model, decoupled=None):
    """Weight decay for matrices only; with ``decoupled`` ((min_lr, max_lr), Megatron-LM's
    --decoupled-min-lr / --decoupled-lr) the input embedding and output layer weights
    (megatron-core marks them ``is_embedding_or_output_parameter``) in groups of their own whose
    ``min_lr``/``max_lr`` megatron-core's scheduler reads. The other parameters come first."""
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            own = decoupled is not None and getattr(p, "is_embedding_or_output_parameter", False)
            groups.setdefault((own, p.ndim == 1), []).append(p)
    out = []
    for own, no_decay in sorted(groups):
        group = dict(params=groups[(own, no_decay)], wd_mult=0.0 if no_decay else 1.0)
        if own:
            group.update(min_lr=decoupled[0], max_lr=decoupled[1])
        out.append(group)
    return out


def partition_by_parameter(params, size: int) -> list:
    """Owner (0..size-1) of each parameter for a ZeRO-1 split by whole tensors: largest first,
    each to the least-loaded rank (ties to the lower rank), so every rank computes the same split."""
    load, owner = [0] * size, [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += params[i].numel()
    return owner


def _grad_of(param):
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


class HostAdamW:
    """AdamW on fp32 master weights for models whose grads live in DDP's ``main_grad``.

    With ``shard_group`` (``--use-distributed-optimizer``: the data x FPDT group, as
    megatron-core's distributed optimizer) each rank keeps Adam state and master weights only
    for the parameters it owns (:func:`partition_by_parameter`), updates those, and
    broadcasts them to the group after the step: ZeRO-1 by whole tensors, like torch's
    ``ZeroRedundancyOptimizer``, whose single-rank state dict does not fit the sharded
    checkpoints here. The gradient norm is still taken over all parameters on every rank
    (each holds the reduced gradients), so a sharded run is bit for bit the unsharded one.
    """

    state_layout = "HostAdamW"  # its checkpoints' optimizer layout (checkpointing.optimizer_format)

    def __init__(self, model, *, lr, weight_decay, betas, eps, clip_grad, tp_group, shard_group=None,
                 decoupled_lr=None, fsdp_group=None, masters_are_params=False, pp_group=None):
        param_groups = _param_groups(model, decoupled_lr)
        self.model_params = [p for g in param_groups for p in g["params"]]
        self.shard_group = shard_group if shard_group is not None and dist.get_world_size(shard_group) > 1 else None
        size = dist.get_world_size(self.shard_group) if self.shard_group is not None else 1
        rank = dist.get_rank(self.shard_group) if self.shard_group is not None else 0
        self._owners = partition_by_parameter(self.model_params, size)
        owned = {id(p) for p, o in zip(self.model_params, self._owners) if o == rank}
        groups = []
        for g in param_groups:
            mine = [p for p in g["params"] if id(p) in owned]
            master = [p.detach().float().clone().requires_grad_() if p.dtype != torch.float32 else p for p in mine]
            groups.append(dict(g, params=master, model_params=mine))
        # fused: no whole-model temporaries (the foreach path makes several); FSDP2's DTensor
        # parameters take the per-tensor path
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "model_params"} for g in groups],
            lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
            **(dict(foreach=False) if fsdp_group is not None else dict(fused=True)))
        # --use-torch-fsdp2: each rank holds a shard of every gradient; the norm sums over the group
        self.fsdp_group = fsdp_group
        self._pairs = [(m, p) for g in groups for m, p in zip(g["params"], g["model_params"])]
        # which fp32 master weights a checkpoint holds ("optimizer.master"): those kept apart from a
        # bf16/fp16 parameter, and with FSDP2's mixed precision (masters_are_params) the float32
        # shards themselves, so a checkpoint has the same entries sharded or not
        self._masters = [i for i, (master, param) in enumerate(self._pairs) if master is not param or masters_are_params]
        self.clip_grad = clip_grad
        self.tp_group = tp_group
        # under a pipeline each stage holds its layers' gradients: the norm sums over the stages
        self.pp_group = pp_group if pp_group is not None and dist.get_world_size(pp_group) > 1 else None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True):
        for master, _ in self._pairs:
            master.grad = None
        for param in self.model_params:
            param.grad = None

    def _grad_norm(self) -> float:
        # Each TP shard counts once; parameters replicated over TP are counted on TP rank 0 only.
        # on the gradients' device (FSDP2 on GPU: CUDA shards), one host synchronisation at the end
        grads = [_grad_of(p) for p in self.model_params]
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        total = torch.zeros((), dtype=torch.float64, device=device)
        for param, grad in zip(self.model_params, grads):
            # the last stage's copy of a tied embedding (megatron-core marks it ``shared``) counts once
            if (grad is not None and param_is_not_tensor_parallel_duplicate(param, self.tp_group)
                    and not getattr(param, "shared", False)):
                # per-tensor norm in fp32 (as megatron-core's multi_tensor_l2norm), summed in
                # float64: no float64 copy of a whole gradient
                total += torch.linalg.vector_norm(local(grad).float()).double() ** 2
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(total, group=self.tp_group)
        if self.fsdp_group is not None:
            dist.all_reduce(total, group=self.fsdp_group)
        if self.pp_group is not None:
            dist.all_reduce(total, group=self.pp_group)
        return math.sqrt(total.item())

    def step(self):
        for master, param in self._pairs:
            grad = _grad_of(param)
            master.grad = None if grad is None else grad.float()
        grad_norm = self._grad_norm()
        if not math.isfinite(grad_norm):
            return False, grad_norm, None
        if self.clip_grad and grad_norm > self.clip_grad:
            scale = self.clip_grad / (grad_norm + 1e-6)
            for master, _ in self._pairs:
                if master.grad is not None:
                    master.grad.mul_(scale)
        self.optimizer.step()
        with torch.no_grad():
            for master, param in self._pairs:
                if master is not param:
                    param.copy_(master)
            if self.shard_group is not None:  # every rank gets the parameters it does not own
                for param, owner in zip(self.model_params, self._owners):
                    dist.broadcast(param.data, src=dist.get_global_rank(self.shard_group, owner),
                                   group=self.shard_group)
        return True, grad_norm, None

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        """Adam moments and fp32 master weights as tensors sharded like the model parameters
        (megatron-core's helpers), so the state reshards with the model; the step is common.
        Sharded, each rank gives only the parameters it owns, as the main replica: the saved
        tensors are the same either way, so a checkpoint loads with or without sharding.
        ``metadata`` (megatron-core's layout options for its own optimizers) changes nothing here."""
        from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                               make_sharded_optimizer_tensor,
                                                               optim_state_to_sharding_state)

        if is_loading:
            prime_adam_state(self.optimizer)
        state = self.optimizer.state_dict()
        # torch shares the live dicts; FSDP2's DTensor state is saved as this rank's shard, as the
        # model's parameters are (megatron-core's sharded_state_dict keeps their local tensors)
        state["state"] = {i: {k: local(v) for k, v in entry.items()} for i, entry in state["state"].items()}
        steps = {float(entry.pop("step")) for entry in state["state"].values()}
        by_index = get_param_id_to_sharded_param_map(model_sharded_state_dict, [local(p) for _, p in self._pairs])
        if self.shard_group is not None:  # the owner is the one copy that is saved and loaded
            by_index = {i: _main_replica(t) for i, t in by_index.items()}
        optim_state_to_sharding_state(state, by_index, exclude_keys=("step",))
        masters = {i: make_sharded_optimizer_tensor(by_index[i], local(self._pairs[i][0]), "optimizer.master")
                   for i in self._masters}
        return {"adam": state, "step": max(steps, default=0.0), "master": masters}

    def reload_model_params(self):
        """Take the fp32 master weights from the model's parameters (after weights were loaded
        into the model without optimizer state), as megatron-core's optimizers do."""
        with torch.no_grad():
            for master, param in self._pairs:
                if master is not param:
                    master.copy_(param)

    def load_state_dict(self, state):
        adam = state["adam"]
        # this run's own groups: their learning rate and weight decay are set by the LR scheduler, loaded
        # next; a checkpoint of another implementation (Megatron-FSDP's) may group its parameters otherwise
        adam["param_groups"] = self.optimizer.state_dict()["param_groups"]
        for i, entry in adam["state"].items():
            entry["step"] = torch.tensor(state["step"])
            master = self._pairs[i][0]
            if is_sharded(master):  # this rank's shards, back into the parameter's DTensor layout
                for key, value in entry.items():
                    if key != "step" and not is_sharded(value):
                        entry[key] = like(master, value)
        self.optimizer.load_state_dict(adam)
        with torch.no_grad():
            for i in self._masters:
                master, param = self._pairs[i]
                local(master).copy_(local(state["master"][i]))
                if master is not param:
                    param.copy_(master)


def prime_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a torch Adam/AdamW that has not stepped yet its state (zeros, step 0), which it
    otherwise creates lazily at the first step: a checkpoint loader needs tensors to fill.
    Optimizers that keep their state some other way are left alone."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def prepare_for_loading(optimizer) -> None:
    """Before a checkpoint's optimizer state is loaded into ``optimizer``. megatron-core's
    optimizers over torch's AdamW (no TransformerEngine or apex installed) read the step from
    the inner optimizer's state, which exists only after a first step; HostAdamW primes itself."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not isinstance(opt, HostAdamW):
            prime_adam_state(inner)


def _load_torch_adam_step_through_distributed_optimizer(optimizer) -> None:
    """Work around two faults of megatron-core 0.16 when it loads a distributed optimizer over
    torch's AdamW (its fallback when neither TransformerEngine nor apex is installed).
    ``load_state_dict`` puts the checkpoint's step into every parameter's state as one shared
    tensor, which torch's AdamW then increments once per parameter at each step (wrong bias
    correction after a resume); and it copies every state entry from the loaded tensors, which
    hold no step: KeyError 'step'. Each parameter gets its own step tensor back, and hands it
    along with its tensors. Only this combination is touched; TransformerEngine's and apex's Adam
    keep no per-parameter step."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not getattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False):
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        original = opt._set_main_param_and_optimizer_states

        def own_step(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                state["step"] = state["step"].clone()
                tensors = {"step": state["step"], **tensors}
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = own_step


def _main_replica(sharded):
    """``sharded`` with the data x FPDT part of its replica id (the last) set to 0."""
    return dataclasses.replace(sharded, replica_id=main_replica_id(sharded.replica_id))


def build_optimizer(config, model, groups):
    """The optimizer for ``model`` (DDP-wrapped, or a list of such model chunks: the pipeline's
    virtual stages) and megatron-core's LR/WD scheduler, for the run ``config``
    (:class:`~megatron.training.config.RunConfig`)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    t = config.training
    # Megatron-FSDP (GPU path) is built with megatron-core's distributed optimizer, as Megatron-LM's
    distributed = config.parallel.use_distributed_optimizer or config.parallel.use_megatron_fsdp
    fsdp = config.parallel.use_torch_fsdp2
    if runtime.current().cuda and not fsdp:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        optimizer_config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad, bf16=t.bf16, fp16=t.fp16, params_dtype=getattr(torch, t.params_dtype),
            use_distributed_optimizer=distributed,
            decoupled_lr=t.decoupled_lr, decoupled_min_lr=t.decoupled_lr_range[0] if t.decoupled_lr is not None else None,
        )
        # with explicit process groups megatron-core takes no gloo side groups (it raises otherwise);
        # the world's backend is device-mapped, so its groups take CPU tensors too (fpdt_ext.runtime)
        optimizer = get_megatron_optimizer(optimizer_config, chunks, pg_collection=groups.pg_collection,
                                           use_gloo_process_groups=False)
        if config.parallel.use_megatron_fsdp:
            from megatron.training.megatron_fsdp import MegatronFSDPOptimizer

            try:
                optimizer = MegatronFSDPOptimizer(optimizer, chunks, getattr(torch, t.params_dtype))
            except ValueError as e:  # an installation this path does not take: a usage error
                from megatron.training.arguments import ArgumentError

                raise ArgumentError(str(e)) from None
        else:
            _load_torch_adam_step_through_distributed_optimizer(optimizer)
    else:
        optimizer = HostAdamW(chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks), lr=t.lr,
                              weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                              clip_grad=t.clip_grad, tp_group=groups.tp,
                              shard_group=groups.dp_sp if distributed else None,
                              decoupled_lr=t.decoupled_lr_range if t.decoupled_lr is not None else None,
                              fsdp_group=groups.dp_sp if fsdp else None,
                              masters_are_params=fsdp and t.params_dtype != "float32",
                              pp_group=getattr(groups, "pp", None))
    # stepped by schedule.increment(batch) after each iteration: once with a constant global batch
    # (Megatron-LM's sample-based lengths are iterations of the global batch here, the same
    # schedule), by the iteration's batch in samples with a batch ramp-up (config.lr_schedule)
    schedule = config.lr_schedule
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if schedule.warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps,
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=schedule.total_steps, wd_incr_style="constant",
        override_opt_param_scheduler=t.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not t.override_opt_param_scheduler)
    return optimizer, scheduler
