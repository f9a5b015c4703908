"""Fully Sharded Sparse Data Parallelism (FSSDP) for expert weights, after Hecate (2025).

Legend: P ranks of the expert group (the mesh's `ep` dim), E experts of a layer, L = E / P experts a
rank owns, H experts a rank holds in a step (its L own + its replicas), N rows routed by this rank.

Expert parallelism pins expert e to one rank: when routing is skewed, the rank holding the hot experts
computes most of the tokens and everybody waits for it. FSSDP keeps each expert's weights (and
optimizer state) on exactly one owner, but every step gives hot experts temporary replicas on other
ranks, so the work spreads. Per MoE layer and step:
  1. owners: `slots` lists the expert in each owner slot, rank r owns slots[r*L:(r+1)*L]. The owner
     holds the weights as this rank's part of the parameter and the optimizer state: nobody else does.
  2. plan (`plan_replicas`): from the tokens per expert of the last `window` steps (all-reduced
     integers, the same on every rank) each rank gets up to `extra_slots` replicas, given greedily to
     the expert with the largest per-holder share on the most loaded rank, on the least loaded rank
     that lacks it, while that lowers the predicted maximum. Ties break by index: the same plan
     everywhere, or the matched point-to-point calls below would hang.
  3. SparseAllGather: owners send each replica's weights to its holders: one batch of point-to-point
     sends/receives, posted when the layer's block starts (so it travels during attention) and
     waited for just before the experts run.
  4. tokens (`route`): a row for expert e stays on its rank when that rank holds e, else goes to e's
     holders in an even split (the remainder rotated by source rank); then the uneven all-to-all, one
     grouped GEMM over the H held experts, and the all-to-all back.
  5. SparseReduceScatter (the backward of 3): each replica's gradient goes back to the owner and is
     added to the owner's own. Gradient norm and clipping then see exactly EP's gradients.
  6. rematerialize: replicas are freed after the layer's forward and gathered again in its backward.
  7. re-sharding every `reshard_every` steps when the balanced ownership changed: owners move
     (weights and optimizer state, point-to-point) so that each rank's own experts carry an even share
     of the load, largest first onto the least loaded rank; fewer replicas are then needed.
With no replicas FSSDP is expert parallelism; with every expert everywhere, data parallelism. Expert
parallelism (`moe.placement = "ep"`) is exactly that: the same `ExpertPlacement`, with the plan that
has no replicas and never moves owners, so there is one token exchange for both placements (with no
replicas it routes on the device, from the counts alone: one host sync per call, for the split sizes).
Checkpoints are written with the ownership moved back to expert order, so they are EP checkpoints
(layout-free like every other) and an EP checkpoint loads into an FSSDP run.

Communicators: everything here runs on the training thread, on the `ep` group's communicator (the
all-to-alls, the SparseAllGather/ReduceScatter point-to-point batches, the owner moves) and on
`dense_dp` (the load history). The prefetched SparseAllGather is asynchronous, but it is posted and
waited for on that same thread, so NCCL sees one thread per communicator. Expert parallelism
uses the same code.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from expertmesh.config import FSSDPConfig
from expertmesh.dist.comm_stats import Comm, group_device
from expertmesh.dist.shards import local_part
from expertmesh.moe.experts import compute
from expertmesh.parallel.expert import all_to_all, source_to_expert_major
from expertmesh.parallel.sharded import local_shard

log = logging.getLogger("expertmesh")
WEIGHTS = ("w1", "w3", "w2")


@dataclass(frozen=True)
class Plan:
    slots: tuple[int, ...]  # expert in each owner slot; rank r owns slots[r*L:(r+1)*L]
    holders: tuple[tuple[int, ...], ...]  # per expert: its owner, then the replica holders ascending
    ranks: int

    @classmethod
    def expert_parallel(cls, num_experts: int, ranks: int, slots=None) -> Plan:
        slots = tuple(range(num_experts)) if slots is None else tuple(slots)
        L = num_experts // ranks
        owner = {e: i // L for i, e in enumerate(slots)}
        return cls(slots, tuple((owner[e],) for e in range(num_experts)), ranks)

    @classmethod
    def everywhere(cls, num_experts: int, ranks: int, slots=None) -> Plan:
        base = cls.expert_parallel(num_experts, ranks, slots)
        return cls(base.slots, tuple((h[0], *(r for r in range(ranks) if r != h[0])) for h in base.holders), ranks)

    @property
    def local_experts(self) -> int:
        return len(self.slots) // self.ranks

    @cached_property
    def _held(self) -> tuple[tuple[int, ...], ...]:
        L = self.local_experts
        return tuple(self.slots[r * L:(r + 1) * L] + tuple(e for e, h in enumerate(self.holders) if r in h[1:])
                     for r in range(self.ranks))

    @cached_property
    def positions(self) -> tuple[dict[int, int], ...]:
        """Per rank: expert -> its index in that rank's held weight stack."""
        return tuple({e: i for i, e in enumerate(self.held(r))} for r in range(self.ranks))

    def held(self, rank: int) -> tuple[int, ...]:
        """Experts `rank` computes this step, in the order of its weight stack: own slots, then replicas."""
        return self._held[rank]

    @property
    def replicas(self) -> int:
        return sum(len(h) - 1 for h in self.holders)

    def digest(self) -> str:
        return hashlib.sha256(repr((self.slots, self.holders, self.ranks)).encode()).hexdigest()[:16]

    def predicted_load(self, load_E) -> list[float]:
        """Rows per rank if each expert's rows split evenly over its holders."""
        out = [0.0] * self.ranks
        for e, h in enumerate(self.holders):
            for r in h:
                out[r] += load_E[e] / len(h)
        return out


def plan_replicas(load_E, slots, ranks: int, extra_slots: int) -> Plan:
    """Replicas for the most loaded experts, at most `extra_slots` per rank, minimising the predicted
    maximum rank load. Pure and deterministic: every rank computes the same plan from the same load."""
    load = [int(v) for v in load_E]
    plan = Plan.expert_parallel(len(load), ranks, slots)
    holders = [list(h) for h in plan.holders]
    rank_load = plan.predicted_load(load)
    free = [extra_slots] * ranks
    while True:
        top = max(range(ranks), key=lambda r: (rank_load[r], -r))
        peak = rank_load[top]
        mine = sorted((e for e in range(len(load)) if top in holders[e] and load[e] > 0),
                      key=lambda e: (-load[e] / len(holders[e]), e))
        for e in mine:
            candidates = [q for q in range(ranks) if free[q] > 0 and q not in holders[e]]
            if not candidates:
                continue
            q = min(candidates, key=lambda r: (rank_load[r], r))
            old, new = load[e] / len(holders[e]), load[e] / (len(holders[e]) + 1)
            if rank_load[q] + new >= peak:
                continue
            for r in holders[e]:
                rank_load[r] += new - old
            rank_load[q] += new
            holders[e].append(q)
            free[q] -= 1
            break
        else:
            return Plan(plan.slots, tuple((h[0], *sorted(h[1:])) for h in holders), ranks)


def balanced_slots(load_E, ranks: int) -> tuple[int, ...]:
    """Ownership with an even load per rank: experts largest first, each onto the least loaded rank
    with a free slot (ties by index); each rank's experts in ascending order."""
    E = len(load_E)
    L = E // ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    sums = [0] * ranks
    for e in sorted(range(E), key=lambda e: (-int(load_E[e]), e)):
        r = min((r for r in range(ranks) if len(owned[r]) < L), key=lambda r: (sums[r], r))
        owned[r].append(e)
        sums[r] += int(load_E[e])
    return tuple(e for r in range(ranks) for e in sorted(owned[r]))


def route(plan: Plan, me: int, counts_E: list[int]) -> tuple[list[list[int]], torch.Tensor]:
    """Where this rank's rows go. Rows arrive grouped by expert (counts_E[e] rows of expert e); returns
    send_PE[q][e] (rows of expert e for rank q, host ints) and `order`, the row indices in sending order: by
    destination, then in the destination's held order (so they arrive ready for its grouped GEMM)."""
    P, E = plan.ranks, len(counts_E)
    position = plan.positions
    send = [[0] * E for _ in range(P)]
    segments = []  # (destination, position there, first row, rows)
    start = 0
    for e, c in enumerate(counts_E):
        holders = plan.holders[e]
        if me in holders:
            chunks = [(me, c)]
        else:
            k = len(holders)
            base, rem = divmod(c, k)
            chunks = [(q, base + ((i - me) % k < rem)) for i, q in enumerate(holders)]
        row = start
        for q, n in chunks:
            if n:
                segments.append((position[q][e], q, row, n))
                send[q][e] += n
                row += n
        start += c
    segments.sort(key=lambda s: (s[1], s[0]))
    firsts = torch.tensor([s[2] for s in segments], dtype=torch.int64)
    sizes = torch.tensor([s[3] for s in segments], dtype=torch.int64)
    dst = torch.cumsum(sizes, 0) - sizes
    total = sum(s[3] for s in segments)
    order = torch.repeat_interleave(firsts - dst, sizes, output_size=total) + torch.arange(total)
    return send, order


def route_owned(plan: Plan, counts_E: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`route` for a plan without replicas, on the counts' device (no host sync): every row goes to its
    expert's owner. Returns send_PE and the row order (None when the owners are in expert order, as
    under expert parallelism: the rows already leave grouped by destination). `rows` may exceed the
    routed rows (the zero rows Triton's dispatch appends): they keep their places, after all the others."""
    P, E = plan.ranks, len(plan.slots)
    owner = torch.tensor([h[0] for h in plan.holders], device=counts_E.device)
    counts = counts_E.to(torch.int64)
    send_PE = (owner[None, :] == torch.arange(P, device=counts.device)[:, None]) * counts[None, :]
    if plan.slots == tuple(range(E)):
        return send_PE, None
    counts = torch.cat([counts, rows - counts.sum()[None]])  # the unrouted rows: one more block, sent last
    slots = torch.tensor([*plan.slots, E], device=counts.device)  # the sending order of the experts
    starts_E = torch.cumsum(counts, 0) - counts
    blocks = counts[slots]
    dst = torch.cumsum(blocks, 0) - blocks
    order = torch.repeat_interleave(starts_E[slots] - dst, blocks, output_size=rows)
    return send_PE, order + torch.arange(rows, device=counts.device)


def _pack(tensors: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    return torch.cat([t[rows].reshape(len(rows), t[0].numel()) for t in tensors], dim=1)


def _unpack(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t[0].numel() for t in like]
    return [part.reshape(-1, *t.shape[1:]) for part, t in zip(flat.split(sizes, dim=1), like, strict=True)]


class Exchange:
    """The point-to-point pattern of one plan at one rank: which own slots go to which replica holder
    (SparseAllGather), and, reversed, which replica gradients go back to which owner."""

    def __init__(self, plan: Plan, me: int, group, comm: Comm, label: str = "fssdp") -> None:
        L = plan.local_experts
        mine = plan.held(me)
        replica_pos = {e: i for i, e in enumerate(mine[L:])}
        self.sends: dict[int, list[int]] = {}  # holder rank -> my slot indices it replicates
        self.recvs: dict[int, list[int]] = {}  # owner rank -> my replica indices it owns
        own_slot = {e: i for i, e in enumerate(plan.slots[me * L:(me + 1) * L])}
        for e in sorted(own_slot):  # expert order on both sides of every pair
            for q in plan.holders[e][1:]:
                self.sends.setdefault(q, []).append(own_slot[e])
        for e in mine[L:]:
            self.recvs.setdefault(plan.holders[e][0], []).append(replica_pos[e])
        self.replicas = len(mine) - L
        self.group, self.comm, self.label = group, comm, label

    def gather_start(self, own: list[torch.Tensor]):
        """Posts the sends of own weights and the receives of replicas; `gather_finish` waits."""
        sends = {q: _pack(own, rows) for q, rows in self.sends.items()}
        row = sum(t[0].numel() for t in own)
        recvs = {r: own[0].new_empty(len(idx), row) for r, idx in self.recvs.items()}
        return self.comm.batch_isend_irecv(sends, recvs, self.group, self.label), recvs, own

    def gather_finish(self, started) -> list[torch.Tensor]:
        works, recvs, own = started
        for w in works:
            w.wait()
        flat = own[0].new_empty(self.replicas, sum(t[0].numel() for t in own))
        for r, idx in self.recvs.items():
            flat[idx] = recvs[r]
        return _unpack(flat, own)

    def reduce(self, replica_grads: list[torch.Tensor], own: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each replica's gradient to its owner; returns the sum of the replicas' gradients per own slot."""
        sends = {r: _pack(replica_grads, idx) for r, idx in self.recvs.items()}
        row = sum(t[0].numel() for t in own)
        recvs = {q: own[0].new_empty(len(slots), row) for q, slots in self.sends.items()}
        for w in self.comm.batch_isend_irecv(sends, recvs, self.group, self.label):
            w.wait()
        total = own[0].new_zeros(own[0].shape[0], row)
        for q, slots in sorted(self.sends.items()):  # a fixed order: the same sum on every run
            total.index_add_(0, torch.tensor(slots, device=total.device), recvs[q])
        return _unpack(total, own)


class _Replicas(torch.autograd.Function):
    """Forward: the replicas already gathered. Backward: SparseReduceScatter into the own weights."""

    @staticmethod
    def forward(ctx, exchange, started, w1, w3, w2):
        ctx.exchange, ctx.own = exchange, (w1.detach(), w3.detach(), w2.detach())
        return tuple(exchange.gather_finish(started))

    @staticmethod
    def backward(ctx, g1, g3, g2):
        return (None, None, *ctx.exchange.reduce([g1, g3, g2], list(ctx.own)))


def held_weights(exchange: Exchange | None, own: list[torch.Tensor], started=None) -> list[torch.Tensor]:
    """The weight stacks of every expert this rank computes: its own slots, then its replicas."""
    if exchange is None:  # nothing replicated anywhere: plain expert parallelism
        return own
    started = exchange.gather_start([w.detach() for w in own]) if started is None else started
    replicas = _Replicas.apply(exchange, started, *own)
    return [torch.cat([w, r]) for w, r in zip(own, replicas, strict=True)]


class ExpertPlacement(nn.Module):
    """One MoE layer's experts over an expert group: the token dispatcher that `place_experts` swaps into
    the layer (`MoELayer.dispatcher`). With `cfg` None: expert parallelism (the plan without replicas,
    which nothing changes); else FSSDP, whose plans and owners the `FSSDP` manager sets every step.
    No parameters of its own: the layer's experts module is passed in with the rows."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup, comm: Comm, cfg: FSSDPConfig | None = None) -> None:
        super().__init__()
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"ep={self.size} does not divide num_experts={num_experts}")
        self.num_experts, self.local = num_experts, num_experts // self.size
        self.group, self.comm = group, comm
        self.cfg = cfg or FSSDPConfig(extra_slots=0, reshard_every=0)
        self.extra_slots = self.cfg.extra_slots if self.cfg.extra_slots >= 0 else self.local
        self.plan = Plan.expert_parallel(num_experts, self.size)
        self._exchange: tuple[Plan, Exchange | None] | None = None
        # FSSDP: rows computed here per call since the manager's last `record` (None: nobody reads them)
        self.rows: list[int] | None = [] if cfg is not None else None
        self._prefetched = None  # a SparseAllGather posted by `prefetch`, consumed by the next call

    def local_slice(self) -> slice:
        return slice(self.rank * self.local, (self.rank + 1) * self.local)

    def prefetch(self, experts) -> None:
        """Posts this step's SparseAllGather early (called before the attention of the layer's block), so
        the weights travel while attention computes; the MoE call then only waits for them."""
        xch = self.exchange(self.plan)
        if xch is not None and not self.cfg.calibrate and not self.cfg.rematerialize:
            self._prefetched = xch.gather_start([local_shard(getattr(experts, n)).detach() for n in WEIGHTS])

    def exchange(self, plan: Plan) -> Exchange | None:
        """The plan's point-to-point pattern, built once per plan (plans change once per step at most)."""
        if self._exchange is None or self._exchange[0] != plan:
            self._exchange = (plan, Exchange(plan, self.rank, self.group, self.comm) if plan.replicas else None)
        return self._exchange[1]

    @torch.compiler.disable
    def forward(self, x_sorted_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts) -> torch.Tensor:
        """Runs eagerly between two compiled graphs (train.compile): the split sizes are host values and the
        collectives go through the counting wrapper, which Dynamo would cut into many small graphs."""
        # Host syncs: with replicas, this rank's counts (to split its rows over holders); always the split
        # sizes (the rows sent to and received from each rank).
        counts, plan = None, self.plan
        if self.cfg.calibrate:  # this batch's own counts, summed over the group: the plan fits exactly
            counts = tokens_per_expert_E.tolist()
            total = self.comm.all_reduce_ints(counts, self.group, "fssdp")
            plan = plan_replicas(total, plan.slots, self.size, self.extra_slots)
        xch = self.exchange(plan)
        # with replicas the weight stacks are read here (FSSDP's experts are never FSDP-sharded); without,
        # the experts module is called, so FSDP over expert_dp (expert parallelism) gathers them first
        own = [local_shard(getattr(experts, n)) for n in WEIGHTS] if xch is not None else None
        remat = self.cfg.rematerialize and xch is not None
        started, self._prefetched = self._prefetched, None
        if started is None and xch is not None and not remat:
            started = xch.gather_start([w.detach() for w in own])

        if plan.replicas:
            send, order = route(plan, self.rank, counts if counts is not None else tokens_per_expert_E.tolist())
            send_PE = torch.tensor(send, dtype=torch.int64, device=x_sorted_ND.device)
            order = order.to(x_sorted_ND.device)
        else:
            send_PE, order = route_owned(plan, tokens_per_expert_E.detach(), x_sorted_ND.shape[0])
        recv_PE = torch.empty_like(send_PE)
        self.comm.all_to_all_single(recv_PE, send_PE, None, None, self.group, "ep")
        in_splits, out_splits = torch.stack([send_PE.sum(1), recv_PE.sum(1)]).tolist()
        x_send = x_sorted_ND if order is None else x_sorted_ND[order]
        x_recv = all_to_all(x_send[:sum(in_splits)], out_splits, in_splits, self.group, self.comm)  # (Triton's
        # dispatch appends unrouted rows: never sent)
        recv_PH = recv_PE[:, list(plan.held(self.rank))]
        perm = source_to_expert_major(recv_PH, x_recv.shape[0])
        counts_H = recv_PH.sum(0)
        if self.rows is not None and torch._C._current_graph_task_id() == -1:  # not AC's recompute (in backward)
            self.rows.append(x_recv.shape[0])  # every row received is for an expert held here
        if xch is None:
            y_held = experts(x_recv[perm], counts_H)
        elif remat:
            y_held = checkpoint(_gather_and_compute, xch, x_recv[perm], counts_H, *own, use_reentrant=False)
        else:
            y_held = compute(x_recv[perm], counts_H, *held_weights(xch, own, started))
        y_recv = torch.empty_like(y_held).index_copy(0, perm, y_held) if y_held.shape[0] else y_held
        y_back = all_to_all(y_recv, in_splits, out_splits, self.group, self.comm)
        if order is None or not y_back.shape[0]:
            return y_back
        return torch.empty_like(y_back).index_copy(0, order[:y_back.shape[0]], y_back)


def _gather_and_compute(xch, x_held, counts_H, w1, w3, w2):
    return compute(x_held, counts_H, *held_weights(xch, [w1, w3, w2]))


class FSSDP:
    """The per-step side of FSSDP for a whole model: load history, plans, re-sharding, checkpoints.

    `load_group` spans every rank that shares the experts' ownership (dense_dp: the ep group and its
    data-parallel copies), so all of them hold the same history and move owners identically."""

    def __init__(self, layers, cfg: FSSDPConfig, load_group, comm: Comm, layer_ids: list[int] | None = None) -> None:
        self.layers = list(layers)
        self.layer_ids = list(range(len(self.layers))) if layer_ids is None else list(layer_ids)  # model indices
        self.placements: list[ExpertPlacement] = [layer.dispatcher for layer in self.layers]
        self.cfg, self.load_group, self.comm = cfg, load_group, comm
        self.history: deque[list[list[int]]] = deque(maxlen=cfg.window)
        self.reshards = 0
        self._rows_window: list[list[int]] = []  # per step: rows computed here, per layer
        self.last_rows: list[int] = []

    def window_load(self) -> list[list[int]]:
        return [[sum(step[i][e] for step in self.history) for e in range(p.num_experts)]
                for i, p in enumerate(self.placements)]

    def begin_step(self, step: int, optimizer) -> None:
        """Re-shards on schedule, then plans this step's replicas from the load of the last steps."""
        if not self.history:
            return
        load = self.window_load()
        R = self.cfg.reshard_every
        if R and step > 1 and (step - 1) % R == 0:
            target = [balanced_slots(load_E, p.size) for load_E, p in zip(load, self.placements, strict=True)]
            if target != [p.plan.slots for p in self.placements]:
                self.reshard(target, optimizer)
                self.reshards += 1
        for load_E, p in zip(load, self.placements, strict=True):
            p.plan = plan_replicas(load_E, p.plan.slots, p.size, p.extra_slots)

    def record(self, step_load: list[list[torch.Tensor]]) -> None:
        """After a step: this step's tokens per expert (per micro-batch, per layer), summed over the
        load group, join the history; the rows each rank computed are kept for the metrics. A pipeline
        stage without MoE layers has nothing to record (its load group is the stage's own: no peer waits)."""
        if not self.placements:
            self.history.append([])
            self._rows_window.append([])
            return
        per_layer = [torch.stack(layer).sum(0) for layer in zip(*step_load, strict=True)]
        sizes = [t.numel() for t in per_layer]
        packed = self.comm.all_reduce_ints(torch.cat(per_layer).to(torch.int64), self.load_group, "fssdp")
        self.history.append([packed[a - n: a] for a, n in zip(itertools.accumulate(sizes), sizes, strict=True)])
        self.last_rows = [sum(p.rows) for p in self.placements]
        self._rows_window.append(self.last_rows)
        for p in self.placements:
            p.rows = []

    def stats(self) -> dict:
        """Rows computed per rank in the window, per layer: max/mean over the expert group, and the plan."""
        if not self.placements:  # a pipeline stage without MoE layers
            self._rows_window = []
            return {"layers": [], "load_max_over_mean": [], "replicas": [], "reshards": self.reshards}
        rows = torch.tensor(self._rows_window, dtype=torch.float64).sum(0)  # [layers]
        self._rows_window = []
        group = self.placements[0].group
        n = dist.get_world_size(group)
        gathered = torch.zeros(n, rows.numel(), dtype=torch.float64)
        gathered[dist.get_rank(group)] = rows
        gathered = gathered.to(group_device(group) or "cpu")
        self.comm.all_reduce(gathered, group, "metrics")
        mean = gathered.mean(0)
        ratio = [float(m) / float(a) if a > 0 else 1.0 for m, a in zip(gathered.max(0).values, mean, strict=True)]
        return {"layers": self.layer_ids, "load_max_over_mean": ratio,
                "replicas": [p.plan.replicas for p in self.placements], "reshards": self.reshards}

    @staticmethod
    def merge_stages(per_stage: list[dict]) -> dict:
        """`stats` of the ranks of a pipeline (one per pp rank, each holding one or more stages) as one
        record: per-layer lists in the model's layer order (a stage without MoE layers adds none), reshards
        summed over the ranks."""
        rows = sorted((layer, s["load_max_over_mean"][i], s["replicas"][i])
                      for s in per_stage for i, layer in enumerate(s["layers"]))
        return {"layers": [r[0] for r in rows], "load_max_over_mean": [r[1] for r in rows],
                "replicas": [r[2] for r in rows], "reshards": sum(s["reshards"] for s in per_stage)}

    # -- ownership moves ---------------------------------------------------------------------

    def _moving_tensors(self, layer, optimizer) -> list[torch.Tensor]:
        """This rank's rows of every tensor that belongs to an owner slot: weights and optimizer state."""
        out = []
        for name in WEIGHTS:
            param = getattr(layer.experts, name)
            out.append(local_part(param.data))
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            out += [local_part(v) for k, v in sorted(state.items()) if isinstance(v, torch.Tensor) and v.ndim > 0]
        return out

    @torch.no_grad()
    def reshard(self, target: list[tuple[int, ...]], optimizer) -> None:
        """Moves every layer's owner slots to `target` (weights and optimizer state, point-to-point)."""
        for layer, p, new in zip(self.layers, self.placements, target, strict=True):
            old = p.plan.slots
            if tuple(new) != old:
                move_slots(self._moving_tensors(layer, optimizer), old, tuple(new), p.size, p.rank, p.group, self.comm)
                p.plan = Plan.expert_parallel(p.num_experts, p.size, new)

    @contextmanager
    def canonical(self, optimizer):
        """Ownership in expert order (rank r owns experts r*L..): checkpoints are written so."""
        current = [p.plan for p in self.placements]
        self.reshard([tuple(range(p.num_experts)) for p in self.placements], optimizer)
        try:
            yield
        finally:
            self.reshard([plan.slots for plan in current], optimizer)
            for p, plan in zip(self.placements, current, strict=True):
                p.plan = plan

    def state_dict(self) -> dict:
        return {"slots": [list(p.plan.slots) for p in self.placements], "history": list(self.history),
                "reshards": self.reshards}

    def load_state_dict(self, state: dict, optimizer) -> None:
        """After the (expert-ordered) weights were loaded: the saved ownership and load history."""
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.reshards = state["reshards"]
        self.reshard([tuple(s) for s in state["slots"]], optimizer)


def move_slots(tensors: list[torch.Tensor], old: tuple[int, ...], new: tuple[int, ...], ranks: int, me: int,
               group, comm: Comm) -> None:
    """Rewrites this rank's rows of `tensors` (each [L, ...]) from ownership `old` to `new`."""
    L = len(old) // ranks
    where_old = {e: i for i, e in enumerate(old)}
    # Experts moving from rank r to rank q, in q's new slot order: both sides list them alike.
    moving: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(new):
        moving.setdefault((where_old[e] // L, i // L), []).append(e)
    sends = {q: _pack(tensors, [where_old[e] % L for e in es]) for (r, q), es in moving.items() if r == me and q != me}
    width = sum(t[0].numel() for t in tensors)
    recvs = {r: tensors[0].new_empty(len(es), width) for (r, q), es in moving.items() if q == me and r != me}
    kept = _pack(tensors, [where_old[e] % L for e in moving.get((me, me), [])])
    works = comm.batch_isend_irecv(sends, recvs, group, "fssdp")
    for w in works:
        w.wait()
    index = {e: i % L for i, e in enumerate(new)}
    rows = torch.empty(L, width, dtype=tensors[0].dtype, device=tensors[0].device)
    for (r, q), es in moving.items():
        if q == me:
            rows[[index[e] for e in es]] = kept if r == me else recvs[r]
    for t, part in zip(tensors, _unpack(rows, tensors), strict=True):
        t.copy_(part)
