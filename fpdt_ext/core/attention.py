"""FPDT attention: chunked, offloading, pipelined causal attention over an SP group.

Inputs are local pieces in the FPDT layout (see :mod:`fpdt_ext.core.layout`), shaped
like megatron-core's core attention: q ``[s/P, b, H, d]``, k and v
``[s/P, b, KV, d]``. Per local chunk i (c = s/(P*u) tokens):

forward, i = 0..u-1
    all-to-all q_i, k_i, v_i to ``[b, P*c, H/P, d]`` (chunk i+1's is in flight meanwhile);
    store k_i, v_i (offloaded when on); diagonal block with a causal mask;
    then KV chunks j = 0..i-1, each fetched while the previous one computes,
    folded in with the online-softmax merge; store q_i, out_i, lse_i;
    all-to-all out_i back.

backward, outer j = 0..u-1 over KV chunks, inner i = j..u-1 over query chunks
    KV chunk j stays resident while query chunks stream through; at the end of
    outer step j, dq_j, dk_j and dv_j are complete and their all-to-all back
    starts at once, overlapping step j+1.

With offload on, at most two KV chunks are on the device during the forward
(the one computing and the one being fetched), and at most two chunks of each
kind during the backward.

:func:`forward_chunks` and :func:`backward_chunks` are the loops; they take
chunks from a callback and hand finished gradients to a :class:`GradSink`, so
:mod:`fpdt_ext.core.qkv` can project q/k/v from hidden states one chunk at a time
and take each chunk's gradient back through the projection as it completes.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Tuple

import torch

from fpdt_ext.core import kernels
from fpdt_ext.core.comm import Pending, group_size, head_to_seq, seq_to_head
from fpdt_ext.core.config import ChunkPlan, FPDTConfig, check_attention_inputs, default_softmax_scale, kv_replication
from fpdt_ext.memory.offload import ChunkStore, Residency
from fpdt_ext.profiling import ATTENTION_CHUNK_BACKWARD, ATTENTION_CHUNK_FORWARD, phase

Tensor = torch.Tensor

# How many all-to-alls back to the sequence layout may be in flight before we wait.
_MAX_INFLIGHT = 4


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Static knobs of one call: the chunking (from :meth:`FPDTConfig.plan`) and what the inputs
    decide (softmax scale, KV-head replication, kernel backend). Made by :func:`make_plan`."""

    chunks: ChunkPlan
    scale: float
    kv_rep: int  # each KV head is repeated this often so the SP group can split them
    backend: str

    @property
    def sp_group(self):
        return self.chunks.sp_group

    @property
    def sp_size(self) -> int:
        return self.chunks.sp_size

    @property
    def num_chunks(self) -> int:
        return self.chunks.num_chunks

    @property
    def offload(self) -> bool:
        return self.chunks.offload

    @property
    def tiers(self):
        return self.chunks.tiers


def make_plan(q, k, v, plan: Optional[ChunkPlan] = None, *, sp_group=None, num_chunks: int = 1, offload=False,
              offload_dir=None, softmax_scale=None, backend=None, device=None) -> AttentionPlan:
    """Validate q/k/v (tensors, or meta tensors of their shapes with ``device`` the real one) and
    plan the call. ``plan`` comes from :meth:`FPDTConfig.plan`; without it, one is made the same
    way from ``sp_group``, ``num_chunks``, ``offload`` and ``offload_dir`` (direct calls)."""
    if plan is None:  # the inputs are checked first: their errors name the local shapes
        check_attention_inputs(q, k, v, sp_size=group_size(sp_group), num_chunks=num_chunks)
        config = FPDTConfig(fpdt_parallel_size=group_size(sp_group), fpdt_num_chunks=num_chunks,
                            fpdt_offload=bool(offload), offload_dir=offload_dir if offload else None)
        plan = config.plan(q.shape[0], sp_group)
    check_attention_inputs(q, k, v, sp_size=plan.sp_size, num_chunks=plan.num_chunks)
    head_dim = q.shape[-1]
    return AttentionPlan(
        chunks=plan,
        scale=default_softmax_scale(head_dim) if softmax_scale is None else float(softmax_scale),
        kv_rep=kv_replication(q.shape[2], k.shape[2], plan.sp_size),
        backend=kernels.select_backend(device or q.device, q.dtype, head_dim, backend),
    )


def chunk_store(kind: str, plan: AttentionPlan, device: torch.device, residency: Residency) -> ChunkStore:
    return ChunkStore(kind, device, offload=plan.offload, residency=residency, tiers=plan.tiers)


class AttentionState:
    """What the forward leaves for the backward: the stored chunks and their bookkeeping."""

    def __init__(self, plan: AttentionPlan, device: torch.device, for_backward: bool = True):
        # Without a backward to come (no_grad: evaluation, the first pass of full recompute) only
        # the KV chunks are kept, and only while the forward needs them.
        self.for_backward = for_backward
        self.residency = Residency()
        self.kv = chunk_store("kv", plan, device, self.residency)
        self.qo = chunk_store("qo", plan, device, self.residency)
        self.consumed = False

    def stores(self):
        return (self.kv, self.qo)


def _inflight_guard(pending: "collections.deque[Pending]") -> None:
    while len(pending) > _MAX_INFLIGHT:
        pending.popleft().wait()


def _accumulate(acc: Optional[Tensor], blk: Tensor, dtype: torch.dtype) -> Tensor:
    return blk.to(dtype) if acc is None else acc.add_(blk)


def _repeat_kv(x: Tensor, rep: int) -> Tensor:
    """[c, b, KV, d] -> [c, b, KV*rep, d], each head repeated ``rep`` times in place."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def fpdt_forward(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, state: AttentionState) -> Tensor:
    """Attention output ``[s/P, b, H, d]`` for local q/k/v pieces (see the module docstring)."""
    c = q.shape[0] // plan.num_chunks

    def chunk(i: int):
        sl = slice(i * c, (i + 1) * c)
        return q[sl], k[sl], v[sl]

    return forward_chunks(chunk, torch.empty_like(q), plan, state)


def forward_chunks(chunk_qkv: Callable[[int], Tuple[Tensor, Tensor, Tensor]], out: Tensor,
                   plan: AttentionPlan, state: AttentionState) -> Tensor:
    """The chunked forward; ``chunk_qkv(i)`` makes local chunk i's q/k/v, ``[c, b, heads, d]``.

    Chunks are made one at a time, just before their all-to-all, so a caller that
    projects them from hidden states never holds whole-sequence q/k/v.
    ``out`` (``[s/P, b, H, d]``) is filled chunk by chunk and returned.
    """
    num_chunks, group = plan.num_chunks, plan.sp_group
    c = out.shape[0] // num_chunks
    kv, qo = state.kv, state.qo
    block = dict(scale=plan.scale, backend=plan.backend)

    def send(i: int):  # sequence -> head all-to-all of local chunk i, in flight
        q_i, k_i, v_i = chunk_qkv(i)
        return (
            seq_to_head(q_i, group, async_op=True),  # -> [b, P*c, H/P, d]
            seq_to_head(_repeat_kv(k_i, plan.kv_rep), group, async_op=True),  # -> [b, P*c, KV*rep/P, d]
            seq_to_head(_repeat_kv(v_i, plan.kv_rep), group, async_op=True),
        )

    outgoing = collections.deque()
    incoming = send(0)
    for i in range(num_chunks):
        with phase(ATTENTION_CHUNK_FORWARD):
            q_i, k_i, v_i = (p.wait() for p in incoming)
            if i + 1 < num_chunks:
                incoming = send(i + 1)
            kv.put(i, (k_i, v_i))
            if i > 0:
                kv.prefetch(0)
            out_i, lse_i = kernels.block_forward(q_i, k_i, v_i, causal=True, **block)
            acc = out_i.to(lse_i.dtype)  # [b, P*c, H/P, d] running output, float32 or float64
            kv.release(i)
            for j in range(i):
                k_j, v_j = kv.get(j)
                if j + 1 < i:
                    kv.prefetch(j + 1)
                blk_out, blk_lse = kernels.block_forward(q_i, k_j, v_j, causal=False, **block)
                kernels.merge_into(acc, lse_i, blk_out, blk_lse)
                kv.release(j)
            out_i = acc.to(out.dtype)
            if state.for_backward:
                qo.put(i, (q_i, out_i, lse_i))
            outgoing.append(head_to_seq(out_i, group, out=out[i * c:(i + 1) * c], async_op=True))
            if state.for_backward:
                qo.release(i)
            _inflight_guard(outgoing)
    for p in outgoing:
        p.wait()
    return out


class GradSink:
    """Where the backward's per-chunk gradients land.

    ``targets(i)`` gives the sequence-layout buffers ``[c, b, heads, d]`` that chunk
    i's dq, dk (KV heads replicated) and dv are written into; ``complete(i)`` runs
    once all three have landed. Chunks complete in order 0, 1, ...
    """

    def targets(self, i: int) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def complete(self, i: int) -> None:
        raise NotImplementedError


class _WholeGrads(GradSink):
    """dq/dk/dv for the whole local sequence: the gradients of fpdt_attention's q, k and v."""

    def __init__(self, dout: Tensor, kv_heads: int, rep: int, num_chunks: int):
        s_local, b, _, d = dout.shape
        self.c, self.kv_heads = s_local // num_chunks, kv_heads
        self.grad_q = torch.empty_like(dout)  # [s/P, b, H, d]
        self.grad_k = dout.new_empty(s_local, b, kv_heads * rep, d)  # [s/P, b, KV*rep, d]
        self.grad_v = torch.empty_like(self.grad_k)

    def targets(self, i: int) -> Tuple[Tensor, Tensor, Tensor]:
        sl = slice(i * self.c, (i + 1) * self.c)
        return self.grad_q[sl], self.grad_k[sl], self.grad_v[sl]

    def complete(self, i: int) -> None:
        pass  # written in place

    def result(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.grad_q, unreplicate_kv(self.grad_k, self.kv_heads), unreplicate_kv(self.grad_v, self.kv_heads)


def unreplicate_kv(grad: Tensor, kv_heads: int) -> Tensor:
    """Gradient of :func:`_repeat_kv`: [c, b, KV*rep, d] -> [c, b, KV, d], the copies summed."""
    if grad.shape[2] == kv_heads:
        return grad
    return grad.unflatten(2, (kv_heads, grad.shape[2] // kv_heads)).sum(3)


def fpdt_backward(dout: Tensor, plan: AttentionPlan, state: AttentionState, kv_heads: int):
    """Gradients (dq, dk, dv) in the local layout, from the chunks the forward stored."""
    sink = _WholeGrads(dout, kv_heads, plan.kv_rep, plan.num_chunks)
    backward_chunks(dout, plan, state, sink)
    return sink.result()


def backward_chunks(dout: Tensor, plan: AttentionPlan, state: AttentionState, sink: GradSink, *,
                    overwrite_dout: bool = False) -> None:
    """The pipelined backward; chunk j's dq/dk/dv go to ``sink`` as soon as they are complete.

    ``overwrite_dout``: ``dout`` (contiguous) is scratch, and each chunk's head-layout copy is
    received into its own storage instead of a new buffer.
    """
    num_chunks, group = plan.num_chunks, plan.sp_group
    c = dout.shape[0] // num_chunks
    kv, qo = state.kv, state.qo
    device = dout.device
    # Received in place, the dout chunks live in dout's storage, which stays until the end:
    # offloading copies of them would move nothing off the device.
    do_store = ChunkStore("do", device, offload=plan.offload and not overwrite_dout, residency=state.residency,
                          tiers=plan.tiers)
    dq_store = chunk_store("dq", plan, device, state.residency)
    block = dict(scale=plan.scale, backend=plan.backend)

    # dout chunks to the head layout, each stored as soon as it lands.
    incoming = seq_to_head(dout[0:c], group, async_op=True, in_place=overwrite_dout)
    for i in range(num_chunks):
        do_i = incoming.wait()  # [b, P*c, H/P, d]
        if i + 1 < num_chunks:
            incoming = seq_to_head(dout[(i + 1) * c:(i + 2) * c], group, async_op=True, in_place=overwrite_dout)
        do_store.put(i, (do_i,))
        do_store.release(i)

    dq_sent = {}  # chunk -> its dq all-to-all, in flight
    outgoing = collections.deque()  # (chunk, its three all-to-alls), completed in order

    def finish_oldest():
        j, sends = outgoing.popleft()
        for p in sends:
            p.wait()
        sink.complete(j)

    pairs = [(j, i) for j in range(num_chunks) for i in range(j, num_chunks)]
    dq_kept = None  # dq of the query chunk the next step takes again, left on the device
    kv.prefetch(0)
    for store in (qo, do_store):
        store.prefetch(0)
    for t, (j, i) in enumerate(pairs):
        with phase(ATTENTION_CHUNK_BACKWARD):
            if i == j:  # a new outer step: KV chunk j becomes resident
                k_j, v_j = kv.get(j)
            q_i, out_i, lse_i = qo.get(i)
            (do_i,) = do_store.get(i)
            if dq_kept is not None:
                dq_i, dq_kept = dq_kept, None
            else:
                dq_i = dq_store.get(i)[0] if dq_store.has(i) else None
            nxt = pairs[t + 1] if t + 1 < len(pairs) else None
            if nxt is not None:  # start fetching what the next step needs
                if nxt[0] != j:
                    kv.prefetch(nxt[0])
                if nxt[1] != i:
                    for store in (qo, do_store) + ((dq_store,) if dq_store.has(nxt[1]) else ()):
                        store.prefetch(nxt[1])
            dq_blk, dk_blk, dv_blk = kernels.block_backward(do_i, q_i, k_j, v_j, out_i, lse_i, causal=(i == j), **block)
            # The first contribution becomes the accumulator (float32, or float64 for float64 inputs).
            dq_i = _accumulate(dq_i, dq_blk, lse_i.dtype)
            dk_j = _accumulate(None if i == j else dk_j, dk_blk, lse_i.dtype)
            dv_j = _accumulate(None if i == j else dv_j, dv_blk, lse_i.dtype)
            if i == j:  # dq_i has seen KV chunks 0..i: complete
                dq_sent[i] = head_to_seq(dq_i.to(dout.dtype), group, out=sink.targets(i)[0], async_op=True)
                if dq_store.has(i):
                    dq_store.pop(i)  # after head_to_seq copied dq_i out: a fetched copy is poisoned
            elif nxt is not None and nxt[1] == i:
                # (u-2, u-1) -> (u-1, u-1): the next step completes dq_i at once; stored, it would
                # go to the host and straight back, a fetch no prefetch can hide
                dq_kept = dq_i
            else:
                dq_store.put(i, (dq_i,))
                dq_store.release(i)
            if nxt is None or nxt[1] != i:
                qo.release(i)
                do_store.release(i)
            if i == num_chunks - 1:  # end of outer step j: dk_j, dv_j complete
                kv.pop(j)
                _, dk_out, dv_out = sink.targets(j)
                outgoing.append((j, (dq_sent.pop(j),
                                     head_to_seq(dk_j.to(dout.dtype), group, out=dk_out, async_op=True),
                                     head_to_seq(dv_j.to(dout.dtype), group, out=dv_out, async_op=True))))
                qo.pop(j)
                do_store.pop(j)
                while len(outgoing) > _MAX_INFLIGHT // 2:
                    finish_oldest()
    while outgoing:
        finish_oldest()


def keep_for_backward(ctx, state: AttentionState, *tensors: Optional[Tensor]) -> None:
    """Save ``tensors`` and the state's stored chunks on ctx (``save_for_backward`` keeps them
    in the autograd graph's accounting, e.g. for saved-tensor hooks)."""
    ctx.state, ctx.num_own = state, len(tensors)
    ctx.save_for_backward(*tensors, *(t for store in state.stores() for t in store.stored_tensors()))


def take_for_backward(ctx) -> list:
    """The tensors given to :func:`keep_for_backward`; the state's stores are refilled."""
    state = ctx.state
    if state.consumed:
        raise RuntimeError(
            "fpdt_attention's backward ran twice; its stored chunks are freed after the first "
            "backward, so retain_graph=True / double backward is not supported"
        )
    saved = list(ctx.saved_tensors)
    own, saved = saved[:ctx.num_own], saved[ctx.num_own:]
    for store in state.stores():
        n = len(store.stored_tensors())
        store.restore(saved[:n])
        saved = saved[n:]
    return own


def close_state(state: AttentionState) -> None:
    state.consumed = True
    for store in state.stores():
        store.close()


class FPDTAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper: forward and backward above mirror each other."""

    @staticmethod
    def forward(ctx, q, k, v, plan: AttentionPlan, for_backward: bool = True):
        state = AttentionState(plan, q.device, for_backward)
        out = fpdt_forward(q, k, v, plan, state)
        if not for_backward:  # no backward will run: keep nothing
            close_state(state)
            return out
        ctx.plan, ctx.kv_heads = plan, k.shape[2]
        keep_for_backward(ctx, state)
        return out

    @staticmethod
    def backward(ctx, dout):
        take_for_backward(ctx)
        grads = fpdt_backward(dout.contiguous(), ctx.plan, ctx.state, ctx.kv_heads)
        close_state(ctx.state)
        return (*grads, None, None)


def fpdt_attention(q: Tensor, k: Tensor, v: Tensor, plan: Optional[ChunkPlan] = None, **kwargs) -> Tensor:
    """Causal attention on local pieces in the FPDT layout.

    q ``[s/P, b, H, d]``, k and v ``[s/P, b, KV, d]`` (GQA when KV < H; KV heads
    are replicated when the FPDT size P exceeds or does not divide KV).
    Returns ``[s/P, b, H, d]``. ``plan``: the chunking, from :meth:`FPDTConfig.plan`; or, for
    a direct call, the keyword arguments ``sp_group`` (None: a group of one), ``num_chunks``
    and ``offload`` (chunks not being computed on leave the device: to host memory, or with
    ``offload_dir`` to a file there, :mod:`fpdt_ext.memory.disk`). Also ``softmax_scale`` and
    ``backend`` (the block kernel, see :mod:`fpdt_ext.core.kernels`; default: best available).
    Shapes are checked before any communication.
    """
    attention_plan = make_plan(q, k, v, plan, **kwargs)
    for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return FPDTAttentionFunction.apply(q, k, v, attention_plan, for_backward)
