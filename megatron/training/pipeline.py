"""Pipeline parallelism: megatron-core's schedules drive a training or evaluation step.

With ``--pipeline-model-parallel-size`` > 1 the model chunks of this rank (one per virtual stage,
:func:`~megatron.training.models.build_model_chunks`) run under megatron-core's
``get_forward_backward_func``: 1F1B, or the interleaved schedule with virtual stages. The
loss is normalised as the single-stage loop normalises it (:mod:`megatron.training.training`):
the last stage's loss function gives its masked loss sum over the whole sequence's masked
tokens, and megatron-core's schedule multiplies it by the FPDT (context-parallel) size and
divides it by the micro batches, as our loop does. The loss and token count are reported from
the last stage to every rank.

Every stage reads the micro batches (they are token ids: small), so each FPDT stage computes
its rotary positions itself and only ``[s/P, b, h]`` hidden states pass between stages.

On the CPU the stages talk over gloo with megatron-core's own point-to-point code: gloo has
isend/irecv, so only megatron-core's literal ``device="cuda"`` tensors of its schedule need
redirecting (:func:`fpdt_ext.mcore.cpu_shims.cuda_tensors_on_cpu`). On GPU the same code sends
over NCCL, as in Megatron-LM (untested on GPU here).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from fpdt_ext.mcore import cpu_shims


class PipelineSchedule:
    """The forward-backward (or forward-only) step of a pipelined :class:`~megatron.training.training.Trainer`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def setup(self) -> None:
        """What megatron-core's schedules read from the model's config: the DDP wrappers' no_sync
        (gradients reduce in finalize_model_grads, after the schedule) and, with a loss scale
        (fp16 on GPU), the optimizer's scaling of the last stage's loss."""
        models = self.trainer.models
        scale = getattr(self.trainer.optimizer, "scale_loss", None)  # megatron-core's; HostAdamW has none
        for m in models:
            cfg = m.config
            cfg.no_sync_func = [c.no_sync for c in models] if len(models) > 1 else models[0].no_sync
            cfg.grad_scale_func = scale
            cfg.finalize_model_grads_func = None  # the trainer finalises (and reports) after the schedule

    def total_parameters(self, local: int) -> int:
        """The whole model's parameter count (the last stage's copy of a tied embedding not counted)."""
        shared = sum(p.numel() for m in self.trainer.models for p in m.parameters() if getattr(p, "shared", False))
        total = torch.tensor([local - shared], dtype=torch.int64)
        dist.all_reduce(total, group=self.trainer.groups.pp)  # gloo or device-mapped: CPU tensors work
        return int(total.item())

    def _forward_step(self, data_iterator, model):
        output, loss_mask = self.trainer.forward(next(data_iterator), model)
        return output, functools.partial(self._loss, loss_mask)

    def _loss(self, loss_mask, losses):
        """On the last stage: this rank's masked loss sum over the whole sequence's masked tokens
        (the schedule multiplies it by the FPDT size and divides by the micro batches), and the
        sums to report."""
        local_sum, tokens = self.trainer.masked_sums(losses, loss_mask)
        report = torch.stack([local_sum.detach().double(),
                              tokens.detach().double() / self.trainer.groups.layout.fpdt_parallel_size])
        return local_sum / tokens.clamp(min=1), {"sums": report}

    def run(self, batches: list, *, forward_only: bool) -> torch.Tensor:
        """The schedule over ``batches`` (this data-parallel rank's micro batches of one global
        batch); returns [masked loss sum, masked tokens] of this rank's last-stage pieces (zeros
        on other stages), on the device."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.trainer
        par = t.config.parallel
        models = t.models
        iterators = [iter(batches) for _ in models]  # each chunk runs the micro batches in order
        forward_backward = get_forward_backward_func(
            pp_size=par.pipeline_model_parallel_size, vp_size=par.virtual_pipeline_model_parallel_size)
        redirect = cpu_shims.cuda_tensors_on_cpu() if not t.runtime.cuda else contextlib.nullcontext()
        with redirect:
            store = forward_backward(
                forward_step_func=self._forward_step, data_iterator=iterators if len(models) > 1 else iterators[0],
                model=models if len(models) > 1 else models[0], num_microbatches=len(batches),
                seq_length=t.config.training.seq_length, micro_batch_size=t.config.training.micro_batch_size,
                forward_only=forward_only)
        totals = torch.zeros(2, dtype=torch.float64, device=t.device)
        for entry in store:
            totals += entry["sums"]
        return totals


def forward_through_stages(model, forward, *, seq_length: int, micro_batch_size: int, groups) -> torch.Tensor:
    """One micro batch through the pipeline, forward only, for the evaluation tools: ``forward(model)``
    runs this rank's stage (``model``: its one chunk; the first stage embeds, the others start from
    the previous stage's output, which megatron-core's forward-only schedule passes on); the last
    stage's output is returned on every stage of the pipeline."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from fpdt_ext import runtime

    def step(_, chunk):
        return forward(chunk), lambda output, non_loss_data=False: output

    redirect = cpu_shims.cuda_tensors_on_cpu() if not runtime.current().cuda else contextlib.nullcontext()
    with redirect, torch.no_grad():
        store = get_forward_backward_func(pp_size=dist.get_world_size(groups.pp), vp_size=None)(
            forward_step_func=step, data_iterator=None, model=model, num_microbatches=1, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True, collect_non_loss_data=True)
    last = dist.get_world_size(groups.pp) - 1
    source = dist.get_global_rank(groups.pp, last)
    meta = [(tuple(store[0].shape), store[0].dtype) if dist.get_rank(groups.pp) == last else None]
    dist.broadcast_object_list(meta, src=source, group=groups.pp)
    output = store[0] if dist.get_rank(groups.pp) == last else torch.empty(meta[0][0], dtype=meta[0][1],
                                                                             device=runtime.current().device)
    dist.broadcast(output, src=source, group=groups.pp)
    return output
