"""Chunked logits + cross entropy: never builds [s, vocab] for the local sequence.

Per chunk of tokens: logits = hidden @ W^T on this rank's vocab shard, the
vocab-parallel softmax statistics are all-reduced over the tensor-parallel
group, and the per-token loss and log-sum-exp are kept. The backward
recomputes each chunk's logits from the saved hidden states and the lse, so
its peak is also one chunk of logits. Every GEMM takes its inputs in the
model's dtype (bf16 at tensor-core speed) and sums in float32: logits and the
softmax in float32, the weight gradient summed over chunks in float32
(:func:`fpdt_ext.core.kernels.addmm_fp32`). The arithmetic of the loss is
megatron-core's ``VocabParallelCrossEntropy``; the group is an argument.

Works with tied or untied output weights (pass whichever weight the model
uses) and with a vocab-parallel output layer under TP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from fpdt_ext.core import kernels
from fpdt_ext.core.comm import group_rank, group_size
from fpdt_ext.profiling import LOSS_CHUNK_BACKWARD, LOSS_CHUNK_FORWARD, phase



def _all_reduce(t, op, group):
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _logits(h_c, weight):
    """[c, b, h] x [V/tp, h] -> [c, b, V/tp] logits in float32 (float64 for float64 inputs), from
    one GEMM in the inputs' precision."""
    return kernels.mm_fp32(h_c.reshape(-1, h_c.shape[-1]), weight.t()).view(*h_c.shape[:-1], weight.shape[0])


class _ChunkedVocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, num_chunks):
        # hidden [s, b, h]; weight [V/tp, h]; labels [s, b] -> loss [s, b] float32
        vocab_local = weight.shape[0]
        ctx.compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            vocab_local, group_rank(tp_group), group_size(tp_group))
        loss = torch.empty(labels.shape, dtype=ctx.compute_dtype, device=hidden.device)
        lse = torch.empty_like(loss)
        for h_c, y_c, loss_c, lse_c in zip(*(t.chunk(num_chunks, dim=0) for t in (hidden, labels, loss, lse))):
            with phase(LOSS_CHUNK_FORWARD):
                logits = _logits(h_c, weight)  # [c, b, V/tp], float32 (float64)
                logits_max = _all_reduce(logits.max(dim=-1)[0], dist.ReduceOp.MAX, tp_group)
                _, _, predicted, sum_exp, _ = VocabParallelCrossEntropy.calculate_predicted_logits(
                    logits, y_c, logits_max, vocab_start, vocab_end)  # logits become exp(logits - max)
                _all_reduce(predicted, dist.ReduceOp.SUM, tp_group)
                _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group)
                log_sum_exp = torch.log(sum_exp)
                loss_c.copy_(log_sum_exp - predicted)
                lse_c.copy_(log_sum_exp + logits_max)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tp_group, ctx.num_chunks, ctx.vocab_start = tp_group, num_chunks, vocab_start
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # [s, b]
        hidden, weight, labels, lse = ctx.saved_tensors
        vocab_local = weight.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=ctx.compute_dtype, device=weight.device)
        pieces = (hidden, labels, lse, grad_loss, grad_hidden)
        for h_c, y_c, lse_c, g_c, gh_c in zip(*(t.chunk(ctx.num_chunks, dim=0) for t in pieces)):
            with phase(LOSS_CHUNK_BACKWARD):
                probs = _logits(h_c, weight).sub_(lse_c.unsqueeze(-1)).exp_()  # softmax [c, b, V/tp]
                local = y_c - ctx.vocab_start
                in_shard = (local >= 0) & (local < vocab_local)
                rows = probs.view(-1, vocab_local)
                idx = torch.arange(rows.shape[0], device=rows.device)
                rows[idx, local.clamp(0, vocab_local - 1).reshape(-1)] -= in_shard.reshape(-1).to(rows.dtype)
                probs.mul_(g_c.unsqueeze(-1))  # dL/dlogits
                # Both GEMMs take dL/dlogits in the input dtype (bf16 at tensor-core speed; the
                # products are summed in float32 inside the GEMM and, for the weight, over chunks)
                dlogits = rows.to(hidden.dtype)  # [c*b, V/tp]
                torch.mm(dlogits, weight, out=gh_c.view(-1, gh_c.shape[-1]))  # partial over the vocab shard
                kernels.addmm_fp32(grad_weight, dlogits.t(), h_c.reshape(-1, h_c.shape[-1]))
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.tp_group)  # every TP rank saw part of the vocab
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def chunked_lm_loss(hidden, weight, labels, *, tp_group=None, num_chunks: int = 1):
    """Per-token cross entropy ``[b, s]`` from hidden ``[s, b, h]`` and labels ``[b, s]``.

    Computed in float32 (float64 for float64 inputs), as megatron-core's cross entropy. Chunks
    need not divide the sequence (the last one is shorter).
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be positive, got {num_chunks}")
    loss = _ChunkedVocabParallelLoss.apply(hidden, weight, labels.t().contiguous(), tp_group, num_chunks)
    return loss.t()  # [b, s]
