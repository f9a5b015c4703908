"""The one wrapper every collective goes through, so communication is counted.

`Comm.sent[label]` accumulates the bytes *this rank sends* for each collective, labelled by
the mesh view it ran on ("dense_dp", "ep", …). The figures are the standard per-rank costs of
bandwidth-optimal algorithms, so they are comparable across backends and predictable from
shapes: all-reduce 2(n-1)/n·B, all-gather and reduce-scatter (n-1)/n·B_full, broadcast B on
the root, all-to-all the rows that leave the rank.

A `group` of None means a group of one (an axis of size 1 has no process group): the call
does the local equivalent and counts nothing. Pass `dist.group.WORLD` to mean everyone.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)

    def _count(self, label: str, nbytes: float) -> None:
        self.sent[label] += int(nbytes)

    def take(self) -> dict[str, int]:
        """Returns bytes sent per label since the last call, and resets the counters."""
        out = dict(self.sent)
        self.sent.clear()
        return out

    def all_reduce(self, t: torch.Tensor, group, label: str, op=dist.ReduceOp.SUM, async_op: bool = False):
        if group is None:
            return None
        n = dist.get_world_size(group)
        self._count(label, 2 * (n - 1) / n * _nbytes(t))
        return dist.all_reduce(t, op=op, group=group, async_op=async_op)

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, group, label: str, async_op=False):
        if group is None:
            out.copy_(inp.reshape(out.shape))
            return None
        n = dist.get_world_size(group)
        self._count(label, (n - 1) * _nbytes(inp))
        return dist.all_gather_into_tensor(out, inp, group=group, async_op=async_op)

    def reduce_scatter_tensor(self, out, inp, group, label: str, op=dist.ReduceOp.SUM, async_op=False):
        if group is None:
            out.copy_(inp.reshape(out.shape))
            return None
        n = dist.get_world_size(group)
        self._count(label, (n - 1) / n * _nbytes(inp))
        return dist.reduce_scatter_tensor(out, inp, op=op, group=group, async_op=async_op)

    def broadcast(self, t: torch.Tensor, src: int, group, label: str, async_op: bool = False):
        """`src` is a global rank, as in torch.distributed."""
        if group is None:
            return None
        if dist.get_rank() == src:
            self._count(label, _nbytes(t))
        return dist.broadcast(t, src=src, group=group, async_op=async_op)

    def all_to_all_single(self, out, inp, out_splits, in_splits, group, label: str, async_op=False):
        if group is None:
            out.copy_(inp)
            return None
        me = dist.get_rank(group)
        rows = inp.shape[0]
        row_bytes = _nbytes(inp) // rows if rows else 0
        leaving = rows - (in_splits[me] if in_splits is not None else rows // dist.get_world_size(group))
        self._count(label, leaving * row_bytes)
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)

    def all_reduce_ints(self, values: list[int], group, label: str) -> list[int]:
        """Sums small integer vectors (load counts, flags) across a group; every rank gets the same."""
        t = torch.tensor(values, dtype=torch.int64)
        self.all_reduce(t, group, label)
        return t.tolist()
