"""The sequence <-> head all-to-all for one chunk (Ulysses), on gloo and NCCL.

``seq_to_head`` turns rank r's local chunk i, ``[c, b, H, d]`` (all heads, c
tokens), into ``[b, P*c, H/P, d]``: the contiguous global span of chunk i for
this rank's H/P heads, in the batch-first layout the attention kernels take.
``head_to_seq`` is its inverse. Both may run asynchronously and return a
:class:`Pending` whose ``wait()`` finishes the exchange and the final permute.

The send buffer is always a fresh copy, so a caller may overwrite or free its
input as soon as the call returns. The process group is always an argument;
``None`` means a group of one (no communication).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from fpdt_ext.profiling import ALL_TO_ALL, ALL_TO_ALL_WAIT, phase

Tensor = torch.Tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class Pending:
    """An in-flight all-to-all; ``wait()`` returns the finished tensor."""

    __slots__ = ("_work", "_finish", "_result", "_send")

    def __init__(self, work=None, finish: Optional[Callable[[], Tensor]] = None,
                 send: Optional[Tensor] = None, result: Optional[Tensor] = None):
        self._work = work
        self._finish = finish
        self._send = send  # kept alive until the exchange is done
        self._result = result

    def wait(self) -> Tensor:
        if self._finish is not None:
            with phase(ALL_TO_ALL_WAIT):
                if self._work is not None:
                    self._work.wait()  # sync point: the exchange has landed (NCCL: current stream waits)
                self._result = self._finish()
            self._finish = self._work = self._send = None
        return self._result


def _copy(view: Tensor) -> Tensor:
    buf = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    return buf.copy_(view)


def _exchange(send: Tensor, group, async_op: bool, finish: Callable[[Tensor], Tensor],
              recv: Optional[Tensor] = None) -> Pending:
    recv = torch.empty_like(send) if recv is None else recv.view(send.shape)
    with phase(ALL_TO_ALL):
        work = dist.all_to_all_single(recv, send, group=group, async_op=async_op)
    return Pending(work, lambda: finish(recv), send)


def seq_to_head(x: Tensor, group, *, async_op: bool = False, in_place: bool = False) -> Pending:
    """[c, b, H, d] local chunk -> [b, P*c, H/P, d] global chunk for this rank's heads.

    ``in_place``: receive into x's own storage (x must be contiguous; it is overwritten,
    and with batch 1 the result is a view of it), so no second buffer of the chunk's size
    outlives the call.
    """
    c, b, heads, d = x.shape
    sp = group_size(group)
    if sp == 1:
        return Pending(result=x.transpose(0, 1))  # [b, c, H, d] view
    if in_place and not x.is_contiguous():
        raise ValueError("seq_to_head(in_place=True) needs a contiguous chunk")
    send = _copy(x.unflatten(2, (sp, heads // sp)).permute(2, 1, 0, 3, 4))  # [P, b, c, H/P, d]
    # recv[r] is source rank r's sub-chunk, i.e. global sub-chunk i*P + r, for our heads.
    return _exchange(
        send, group, async_op,
        lambda recv: recv.transpose(0, 1).reshape(b, sp * c, heads // sp, d),  # [b, P*c, H/P, d]
        recv=x if in_place else None,
    )


def head_to_seq(x: Tensor, group, *, out: Optional[Tensor] = None, async_op: bool = False) -> Pending:
    """[b, P*c, H/P, d] -> [c, b, H, d]; written into ``out`` when given."""
    b, span, heads_local, d = x.shape
    sp = group_size(group)
    c = span // sp

    def place(result: Tensor) -> Tensor:  # result: [c, b, P, H/P, d], a strided view
        if out is None:
            return _copy(result).flatten(2, 3)
        out.unflatten(2, (sp, heads_local)).copy_(result)  # the one copy into place
        return out

    if sp == 1:
        return Pending(result=place(x.transpose(0, 1).unsqueeze(2)))
    send = _copy(x.unflatten(1, (sp, c)).transpose(0, 1))  # [P, b, c, H/P, d]
    # recv[r] is our sub-chunk for source rank r's head group.
    return _exchange(send, group, async_op, lambda recv: place(recv.permute(2, 1, 0, 3, 4)))
