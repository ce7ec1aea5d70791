"""Every chunk the FPDT attention loops fetch back from the host or the disk was prefetched.

The design (docs/DESIGN.md, "Offload"): the next chunk is fetched while the current one
computes. So with offload on, no ``ChunkStore.get`` may find its chunk neither on the device
nor on its way there (a miss: on CUDA the compute stream would wait for the whole copy), in
the forward or the backward, for any chunk count; and the loops fetch exactly what their steps
need, nothing twice in a row and nothing they do not use. ``Residency`` counts fetches and
misses per kind of chunk.

What the loops need, with u chunks (DESIGN.md's data flow):

* forward: query chunk i merges KV chunks j < i, one fetch each: u(u-1)/2 KV fetches;
* backward, steps (j, i) for j = 0..u-1, i = j..u-1 (u(u+1)/2 steps): KV chunk j is fetched
  once per outer step (u); the query-side chunks (q/out/lse, dout) are fetched at every step
  whose query chunk differs from the previous step's: every step but (u-1, u-1), which
  follows (u-2, u-1); the partial dq of chunk i is fetched at every step with j >= 1 (it was
  stored by outer step j-1), again except (u-1, u-1), whose dq the previous step just made.

One process (the loops do not depend on the FPDT size); host memory and the disk tier.
"""

from __future__ import annotations

import collections

import pytest
import torch

from fpdt_ext.core import attention as attention_module
from fpdt_ext.core.attention import fpdt_attention
from fpdt_ext.core.qkv import QKVLayout, fpdt_qkv_attention
from fpdt_ext.memory.offload import Residency
from tests.disk_dir import shared_disk_scratch_dir

SUB_CHUNK, BATCH, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 3, 2, 4, 2, 8, 16


def expected_fetches(u: int, dout_offloaded: bool):
    """(forward, backward) fetches per kind, from the steps above."""
    after_first = 1 if u >= 2 else 0  # (u-1, u-1) reuses the previous step's query chunk
    query_side = u * (u + 1) // 2 - after_first
    backward = {"kv": u, "qo": query_side, "dq": u * (u - 1) // 2 - after_first}
    if dout_offloaded:
        backward["do"] = query_side
    forward = {"kv": u * (u - 1) // 2}
    return ({k: n for k, n in forward.items() if n}, {k: n for k, n in backward.items() if n})


class _Recorded(Residency):
    made = []

    def __init__(self):
        super().__init__()
        _Recorded.made.append(self)


def _offload(where):
    return dict(offload=True, offload_dir=shared_disk_scratch_dir() if where == "disk" else None)


def _run(path, u, where, monkeypatch):
    """Forward and backward of one call; the fetch and miss counts after each."""
    monkeypatch.setattr(attention_module, "Residency", _Recorded)
    _Recorded.made.clear()
    gen = torch.Generator().manual_seed(u)
    seq = u * SUB_CHUNK
    if path == "attention":
        inputs = [torch.randn(seq, BATCH, h, HEAD_DIM, generator=gen).requires_grad_()
                  for h in (HEADS, KV_HEADS, KV_HEADS)]
        out = fpdt_attention(*inputs, num_chunks=u, **_offload(where))
    else:  # the QKV path, its output gradient received in place (dout chunks stay resident)
        layout = QKVLayout(HEADS, KV_HEADS, HEAD_DIM)
        inputs = [torch.randn(seq, BATCH, HIDDEN, generator=gen).requires_grad_(),
                  (torch.randn(layout.width, HIDDEN, generator=gen) / 4).requires_grad_()]
        out = fpdt_qkv_attention(inputs[0], inputs[1], None, layout, num_chunks=u,
                                 overwrite_output_grad=True, **_offload(where))
    (residency,) = _Recorded.made
    forward = (dict(residency.fetches), dict(residency.misses))
    torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=gen))
    backward_fetches = collections.Counter(residency.fetches)
    backward_fetches.subtract(forward[0])
    backward = ({k: n for k, n in backward_fetches.items() if n}, dict(residency.misses))
    return forward, backward, residency


@pytest.mark.parametrize("where", ["host", "disk"])
@pytest.mark.parametrize("u", [1, 2, 3, 5])
@pytest.mark.parametrize("path", ["attention", "qkv"])
def test_every_fetched_chunk_was_prefetched(path, u, where, monkeypatch):
    (fwd_fetches, fwd_misses), (bwd_fetches, bwd_misses), residency = _run(path, u, where, monkeypatch)
    want_fwd, want_bwd = expected_fetches(u, dout_offloaded=path == "attention")
    assert not fwd_misses, f"forward fetched without a prefetch: {fwd_misses}"
    assert not bwd_misses, f"backward fetched without a prefetch: {bwd_misses}"
    assert fwd_fetches == want_fwd
    assert bwd_fetches == want_bwd
    assert sum(residency.current.values()) == 0, "every chunk left the device after the backward"


def test_a_get_without_prefetch_is_counted_as_a_miss():
    """The counter the test above relies on: a get of an offloaded chunk nobody prefetched."""
    from fpdt_ext.memory.offload import ChunkStore

    residency = Residency()
    store = ChunkStore("kv", torch.device("cpu"), offload=True, residency=residency)
    for i in range(3):
        store.put(i, (torch.randn(4),))
        store.release(i)
    store.prefetch(0)
    store.get(0)
    store.get(1)  # not prefetched
    store.get(1)  # on the device already: neither a fetch nor a miss
    assert residency.fetches == {"kv": 2} and residency.misses == {"kv": 1}
