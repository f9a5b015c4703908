"""The one wrapper every collective goes through, so communication is counted.

`Comm.sent[label]` accumulates the bytes *this rank sends* for each collective, labelled by
the mesh view it ran on ("dense_dp", "ep", …). The figures are the standard per-rank costs of
bandwidth-optimal algorithms, so they are comparable across backends and predictable from
shapes: all-reduce 2(n-1)/n·B, all-gather and reduce-scatter (n-1)/n·B_full, broadcast B on
the root, all-to-all the rows that leave the rank.

A `group` of None means a group of one (an axis of size 1 has no process group): the call
does the local equivalent and counts nothing. Pass `dist.group.WORLD` to mean everyone. A
`StoreGroup` (ranks of different jobs, met through a shared store: elastic DiLoCo workers) is
driven through its process group's own methods, since c10d's functions refuse groups it did not
create.

**The collective rule.** Every collective expertmesh issues goes through `Comm`, and every tensor it
hands a group lives on the device that group's backend needs: CUDA for NCCL, CPU for gloo (the
elastic DiLoCo `StoreGroup`s are gloo). `Comm` checks it on every call and refuses a tensor on the
wrong device with one line; small host values (flags, counts, metric sums) are made with
`comm.tensor(values, group)`, which puts them where the group needs them. Object collectives,
barriers and point-to-point batches go through `Comm` too. `tests/distributed/test_collective_rule.py`
enforces the rule on CPU: it patches torch.distributed so that a collective called from expertmesh
code outside this module fails.

Collectives that libraries issue themselves (FSDP2's all-gathers and reduce-scatters, DTensor's
redistributions under tensor parallelism) are counted by `CollectiveTap`, a dispatch mode that sees
every c10d op while it is active and labels it by the mesh view its process group belongs to.
"""

from __future__ import annotations

import datetime
import threading
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StoreGroup:
    """A gloo group over ranks of separate jobs: rank `rank` of `size`, meeting under `prefix` of a
    shared TCPStore. Creating it blocks until every member has connected (or `timeout_s` passes);
    any collective on it fails once a member is gone or silent for `timeout_s`."""

    def __init__(self, store, prefix: str, rank: int, size: int, timeout_s: float) -> None:
        self.rank, self.size = rank, size
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size,
                                        datetime.timedelta(seconds=timeout_s))


def group_size(group) -> int:
    if group is None:
        return 1
    return group.size if isinstance(group, StoreGroup) else dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None:
        return 0
    return group.rank if isinstance(group, StoreGroup) else dist.get_rank(group)


def group_device(group) -> torch.device | None:
    """The device a group's backend needs its tensors on; None for a group of one (no communication)
    or a group whose backend takes both (`cpu:gloo,cuda:nccl`)."""
    if group is None:
        return None
    if isinstance(group, StoreGroup):
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def check_device(t: torch.Tensor, group, label: str) -> None:
    want = group_device(group)
    if want is not None and t.device.type != want.type:
        backend = "gloo" if isinstance(group, StoreGroup) else dist.get_backend(group)
        raise RuntimeError(f"collective {label!r} on a {backend} group was given a tensor on {t.device}; "
                           f"{backend} needs {want.type} tensors (make it with comm.tensor(..., group))")


def _done(work, async_op: bool):
    if async_op:
        return work
    work.wait()
    return None


class Comm:
    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)
        self.by_op: dict[str, int] = defaultdict(int)  # "label.op" (op: all_reduce, all_gather, ...)
        self._thread = threading.local()  # busy: inside one of our own calls, the tap must not count it again
        self.paused = False
        self._lock = threading.Lock()

    def count(self, label: str, nbytes: float, op: str = "other") -> None:
        """Records bytes sent under `label` by a collective of kind `op`."""
        if not self.paused:
            with self._lock:  # DiLoCo's background exchange counts from another thread
                self.sent[label] += int(nbytes)
                self.by_op[f"{label}.{op}"] += int(nbytes)

    def total(self) -> int:
        with self._lock:
            return sum(self.sent.values())

    @contextmanager
    def pause(self):
        """Nothing inside is counted (evaluation: the figures are per training step)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    @property
    def busy(self) -> bool:
        return getattr(self._thread, "busy", False)

    @contextmanager
    def own(self):
        """Marks a collective issued under it as counted already (the tap skips it)."""
        self._thread.busy = True
        try:
            yield
        finally:
            self._thread.busy = False

    def take(self) -> dict[str, int]:
        """Returns bytes sent per label since the last call, and resets the counters."""
        with self._lock:
            out = dict(self.sent)
            self.sent.clear()
        return out

    def take_by_op(self) -> dict[str, int]:
        """Bytes sent per "label.op" since the last call, and resets them."""
        with self._lock:
            out = dict(self.by_op)
            self.by_op.clear()
        return out

    def all_reduce(self, t: torch.Tensor, group, label: str, op=dist.ReduceOp.SUM, async_op: bool = False):
        if group is None:
            return None
        check_device(t, group, label)
        n = group_size(group)
        self.count(label, 2 * (n - 1) / n * _nbytes(t), "all_reduce")
        if isinstance(group, StoreGroup):
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            return _done(group.pg.allreduce([t], opts), async_op)
        with self.own():
            return dist.all_reduce(t, op=op, group=group, async_op=async_op)

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, group, label: str, async_op=False):
        if group is None:
            out.copy_(inp.reshape(out.shape))
            return None
        check_device(inp, group, label)
        n = group_size(group)
        self.count(label, (n - 1) * _nbytes(inp), "all_gather")
        if isinstance(group, StoreGroup):
            return _done(group.pg._allgather_base(out, inp), async_op)
        with self.own():
            return dist.all_gather_into_tensor(out, inp, group=group, async_op=async_op)

    def reduce_scatter_tensor(self, out, inp, group, label: str, op=dist.ReduceOp.SUM, async_op=False):
        if group is None:
            out.copy_(inp.reshape(out.shape))
            return None
        check_device(inp, group, label)
        n = group_size(group)
        self.count(label, (n - 1) / n * _nbytes(inp), "reduce_scatter")
        with self.own():
            return dist.reduce_scatter_tensor(out, inp, op=op, group=group, async_op=async_op)

    def broadcast(self, t: torch.Tensor, src: int, group, label: str, async_op: bool = False):
        """`src` is a global rank, as in torch.distributed (a StoreGroup's own rank for a StoreGroup)."""
        if group is None:
            return None
        check_device(t, group, label)
        if isinstance(group, StoreGroup):
            if group.rank == src:
                self.count(label, _nbytes(t), "broadcast")
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            return _done(group.pg.broadcast([t], opts), async_op)
        if dist.get_rank() == src:
            self.count(label, _nbytes(t), "broadcast")
        with self.own():
            return dist.broadcast(t, src=src, group=group, async_op=async_op)

    def all_to_all_single(self, out, inp, out_splits, in_splits, group, label: str, async_op=False):
        if group is None:
            out.copy_(inp)
            return None
        check_device(inp, group, label)
        me = group_rank(group)
        rows = inp.shape[0]
        row_bytes = _nbytes(inp) // rows if rows else 0
        leaving = rows - (in_splits[me] if in_splits is not None else rows // group_size(group))
        self.count(label, leaving * row_bytes, "all_to_all")
        if isinstance(group, StoreGroup):
            return _done(group.pg.alltoall_base(out, inp, out_splits or [], in_splits or [],
                                                dist.AllToAllOptions()), async_op)
        with self.own():
            return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)

    def all_reduce_ints(self, values, group, label: str, op=dist.ReduceOp.SUM) -> list[int]:
        """Sums (or `op`s) small integer vectors (load counts, flags; a list or a tensor) across a group;
        every rank gets the same list. One host sync: the values are needed on the host."""
        if isinstance(values, torch.Tensor):
            t = values.to(group_device(group) or values.device, torch.int64)
        else:
            t = self.tensor(values, group, torch.int64)
        self.all_reduce(t, group, label, op=op)
        return t.tolist()

    @staticmethod
    def tensor(values, group, dtype=torch.float64) -> torch.Tensor:
        """Host values as a tensor on the device `group` needs (CPU for a group of one)."""
        return torch.tensor(values, dtype=dtype, device=group_device(group) or "cpu")

    def barrier(self, group=None, timeout_s: float | None = None) -> None:
        """Everyone in `group` (default: the whole job) has arrived; nothing when no group exists. With
        `timeout_s` under gloo: its monitored barrier, which raises RuntimeError naming the missing ranks
        (NCCL has none: its barrier is bounded by the group's own timeout)."""
        if not dist.is_initialized():
            return
        group = dist.group.WORLD if group is None else group
        with self.own():
            if timeout_s is not None and str(dist.get_backend(group)) == "gloo":
                dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s))
                return
            kw = {"device_ids": [torch.cuda.current_device()]} if str(dist.get_backend(group)) == "nccl" else {}
            dist.barrier(group=group, **kw)

    def broadcast_object(self, obj, src: int, group):
        """`obj` from global rank `src` to every rank of `group` (pickled; NCCL moves it on this rank's GPU)."""
        if group is None:
            return obj
        box = [obj]
        with self.own():
            dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def all_gather_object(self, obj, group) -> list:
        if group is None:
            return [obj]
        out = [None] * group_size(group)
        with self.own():
            dist.all_gather_object(out, obj, group=group)
        return out

    def gather_object(self, obj, dst: int, group) -> list | None:
        """Every rank's `obj` on global rank `dst` (a list in group order), None elsewhere."""
        if group is None:
            return [obj]
        out = [None] * group_size(group) if dist.get_rank() == dst else None
        with self.own():
            dist.gather_object(obj, out, dst=dst, group=group)
        return out

    def send_object(self, obj, dst: int) -> None:
        with self.own():
            dist.send_object_list([obj], dst=dst)

    def recv_object(self, src: int):
        box = [None]
        with self.own():
            dist.recv_object_list(box, src=src)
        return box[0]

    def batch_isend_irecv(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group, label: str):
        """Point-to-point: sends[q] to and recvs[q] from group rank q, issued as one batch; returns the works."""
        for t in (*sends.values(), *recvs.values()):
            check_device(t, group, label)
        ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, q), group) for q, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, q), group) for q, t in recvs.items()]
        if not ops:
            return []
        self.count(label, sum(_nbytes(t) for t in sends.values()), "p2p")
        with self.own():
            return dist.batch_isend_irecv(ops)


_FUNCTIONAL_COST = {  # bytes one rank sends, from the input's bytes B and the group size n
    "all_reduce": lambda b, n: 2 * (n - 1) / n * b,
    "all_reduce_": lambda b, n: 2 * (n - 1) / n * b,
    "all_reduce_coalesced": lambda b, n: 2 * (n - 1) / n * b,
    "all_gather_into_tensor": lambda b, n: (n - 1) * b,
    "all_gather_into_tensor_coalesced": lambda b, n: (n - 1) * b,
    "reduce_scatter_tensor": lambda b, n: (n - 1) / n * b,
    "reduce_scatter_tensor_coalesced": lambda b, n: (n - 1) / n * b,
    "broadcast": lambda b, n: b,
}
_C10D_COST = {  # op name -> (index of the input tensor(s), index of the process group, cost)
    "allreduce_": (0, 1, _FUNCTIONAL_COST["all_reduce"]),
    "_allgather_base_": (1, 2, _FUNCTIONAL_COST["all_gather_into_tensor"]),
    "allgather_": (1, 2, _FUNCTIONAL_COST["all_gather_into_tensor"]),
    "allgather_into_tensor_coalesced_": (1, 2, _FUNCTIONAL_COST["all_gather_into_tensor"]),
    "_reduce_scatter_base_": (1, 2, _FUNCTIONAL_COST["reduce_scatter_tensor"]),
    "reduce_scatter_tensor_coalesced_": (1, 2, _FUNCTIONAL_COST["reduce_scatter_tensor"]),
    "broadcast_": (0, 1, _FUNCTIONAL_COST["broadcast"]),
}


def _bytes_of(x) -> int:
    if isinstance(x, torch.Tensor):
        return _nbytes(x)
    if isinstance(x, (list, tuple)):
        return sum(_bytes_of(v) for v in x)
    return 0


class CollectiveTap(TorchDispatchMode):
    """While active, counts the bytes of every collective not issued through `comm` itself, labelled
    by `labels[group_name]` ("other" for a group no view owns). A Python dispatch mode sees every op,
    which costs ~15% of a small CPU step, so the training loop turns it on for one step per metrics
    window: what FSDP and DTensor send depends only on shapes, the same every step."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Off while Dynamo traces and compiles, on again while compiled graphs run: a mode that Dynamo
        cannot see through would make every compiled block run eagerly on the sampled step."""
        return True

    def __init__(self, comm: Comm, labels: dict[str, str]) -> None:
        super().__init__()
        self.comm, self.labels = comm, labels
        self.sent: dict[str, int] = defaultdict(int)  # "label.op"
        self.steps = 0  # steps observed since the last take()

    def _record(self, group_name: str, nbytes: float, op: str) -> None:
        self.sent[f"{self.labels.get(group_name, 'other')}.{_op_kind(op)}"] += int(nbytes)

    def take_per_step(self) -> dict[str, float]:
        """Bytes per step per "label.op" since the last call (sum the ops for a label's total)."""
        out = {k: v / self.steps for k, v in self.sent.items()} if self.steps else {}
        self.sent.clear()
        self.steps = 0
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if not self.comm.busy and ns == "_c10d_functional" and name in _FUNCTIONAL_COST:
            group_name = args[-1] if isinstance(args[-1], str) else kwargs.get("group_name")
            n = dist.get_world_size(dist.distributed_c10d._resolve_process_group(group_name))
            self._record(group_name, _FUNCTIONAL_COST[name](_bytes_of(args[0]), n), name)
        elif not self.comm.busy and ns == "_c10d_functional" and name == "all_to_all_single":
            group_name = args[3]
            group = dist.distributed_c10d._resolve_process_group(group_name)
            me, rows = dist.get_rank(group), args[0].shape[0]
            splits = args[2] or [rows // dist.get_world_size(group)] * dist.get_world_size(group)
            self._record(group_name, (rows - splits[me]) * (_nbytes(args[0]) // max(rows, 1)), name)
        elif not self.comm.busy and ns == "c10d" and name == "send":  # pipeline stages' p2p (torch's isend)
            tensors, group = args[0], args[1]
            group = dist.ProcessGroup.unbox(group) if isinstance(group, torch.ScriptObject) else group
            self._record(group.group_name, sum(_nbytes(t) for t in tensors), name)
        elif not self.comm.busy and ns == "c10d" and name == "alltoall_base_":
            out, inp, group, _out_splits, in_splits = args[:5]
            group = dist.ProcessGroup.unbox(group) if isinstance(group, torch.ScriptObject) else group
            rows = inp.shape[0]
            own = in_splits[group.rank()] if in_splits else rows // group.size()
            self._record(group.group_name, (rows - own) * (_nbytes(inp) // max(rows, 1)), name)
        elif not self.comm.busy and ns == "c10d" and name in _C10D_COST:
            t_i, g_i, cost = _C10D_COST[name]
            group = args[g_i]
            if isinstance(group, torch.ScriptObject):  # how c10d ops carry their group
                group = dist.ProcessGroup.unbox(group)
            self._record(group.group_name, cost(_bytes_of(args[t_i]), group.size()), name)
        return func(*args, **kwargs)


def _op_kind(name: str) -> str:
    """A c10d or functional op's name as one of Comm's op kinds."""
    for kind, prefixes in (("all_reduce", ("all_reduce", "allreduce")), ("all_gather", ("all_gather", "allgather",
                                                                                          "_allgather")),
                           ("reduce_scatter", ("reduce_scatter", "_reduce_scatter")), ("broadcast", ("broadcast",)),
                           ("all_to_all", ("all_to_all", "alltoall")), ("send", ("send",))):
        if name.startswith(prefixes):
            return kind
    return "other"


def view_labels(views: dict) -> dict[str, str]:
    """group_name -> view name for a mesh's 1-D views; when two views share a group (ep = 1 makes
    dense_dp and expert_dp the same ranks), the first of dense_dp, expert_dp, then the axes wins."""
    order = ["dense_dp", "expert_dp", "ep", "tp", "dp", "dp_replicate"]
    labels: dict[str, str] = {}
    for view in sorted(views, key=lambda v: order.index(v) if v in order else len(order)):
        labels.setdefault(views[view].get_group().group_name, view)
    return labels
