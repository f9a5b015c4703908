"""Replicated data parallelism (`parallel.dp_shard = false`): gradient averaging over the right group
per parameter; and the global gradient-norm clip, for every layout.

Dense weights are replicated over `dense_dp` (dp_replicate x dp x ep) and averaged there. Expert
weights under expert parallelism are replicated only over `expert_dp`; their gradients already
hold the contributions of every ep rank's tokens (the all-to-all backward brought them), so they
are summed over expert_dp and divided by the dense_dp degree: both kinds of gradient then belong
to the mean loss over all dense_dp ranks.

Gradients are packed into flat buckets (one all-reduce per ~`bucket_mb` MiB). Every rank iterates
parameters in the same registration order, so the buckets line up across ranks — a different
order would sum unrelated gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.shards import local_part


@dataclass
class GradGroup:
    params: list[nn.Parameter]
    group: object  # ProcessGroup, or None for a group of one
    label: str
    divisor: int  # the sum over `group` is divided by this


class GradAverager:
    def __init__(self, groups: list[GradGroup], comm: Comm, bucket_mb: float = 25.0) -> None:
        self.comm = comm
        self.buckets: list[tuple[GradGroup, list[nn.Parameter]]] = []
        limit = int(bucket_mb * 2**20)
        for g in groups:
            bucket, size = [], 0
            for p in g.params:
                nbytes = p.numel() * p.element_size()
                if bucket and size + nbytes > limit:
                    self.buckets.append((g, bucket))
                    bucket, size = [], 0
                bucket.append(p)
                size += nbytes
            if bucket:
                self.buckets.append((g, bucket))

    @torch.no_grad()
    def average(self) -> None:
        for _, bucket in self.buckets:
            for p in bucket:
                # Gradients laid out as their parameters: sequence-parallel norm weights get partial sums over
                # tp (added up here), and a vocab-parallel embedding fed by a pipeline stage's input gets a
                # replicated gradient (its rows taken here), which the local parts below must not mix up.
                if isinstance(p.grad, DTensor) and tuple(p.grad.placements) != tuple(p.placements):
                    p.grad = p.grad.redistribute(placements=p.placements)
        for g, bucket in self.buckets:
            if g.group is None and g.divisor == 1:
                continue
            # DTensor parameters (tensor/expert parallel) are reduced through their local parts.
            grads = [local_part(p.grad) if p.grad is not None else torch.zeros_like(local_part(p)) for p in bucket]
            flat = torch.cat([x.reshape(-1) for x in grads])
            self.comm.all_reduce(flat, g.group, g.label)
            flat.div_(g.divisor)
            offset = 0
            for p, x in zip(bucket, grads, strict=True):
                if p.grad is None:
                    p.grad = _like(p, flat[offset: offset + x.numel()].view_as(x).clone())
                else:
                    x.copy_(flat[offset: offset + x.numel()].view_as(x))
                offset += x.numel()


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False)
    return local


def _sharded_dims(t: torch.Tensor) -> tuple[tuple[str, object], ...]:
    """(mesh dim name, process group) of each mesh dim a (gradient) tensor is sharded on: its global
    squared norm is the sum of the local ones over those. Replicated dims hold copies."""
    if not isinstance(t, DTensor):
        return ()
    mesh = t.device_mesh
    return tuple((mesh.mesh_dim_names[i], mesh.get_group(i)) for i, pl in enumerate(t.placements)
                 if pl.is_shard() or isinstance(pl, _StridedShard))  # FSDP's shard of a tp shard


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], comm: Comm, max_norm: float, across=None) -> torch.Tensor:
    """Clips by the norm of the full gradient of the whole model, whatever the layout. Each rank sums
    the squares of its local gradient parts per kind of sharding; each sum is all-reduced over the
    groups that kind is sharded on; `across` (the pipeline's group: each stage holds other parameters)
    sums the total over the stages. Every rank gets the same norm and the same scale. Returns the norm
    as a tensor on the gradients' device: nothing here waits for the device."""
    parts: dict[tuple[str, ...], list[torch.Tensor]] = {}
    groups: dict[tuple[str, ...], list] = {}
    devices: dict[tuple[str, ...], torch.device] = {}
    for p in params:
        # Keys from the parameters' sharding, not from the gradients present: a parameter without a gradient
        # on some rank (a layer its tokens skipped) must not leave that rank out of a collective the others join.
        dims = _sharded_dims(p)
        key = tuple(name for name, _ in dims)  # names, not groups: the same keys on every rank
        groups[key], devices[key] = [g for _, g in dims], local_part(p).device
        parts.setdefault(key, [])
        if p.grad is not None:
            parts[key].append(local_part(p.grad))
    total = None
    for key in sorted(parts):
        # fp64 accumulation, as the norms of one process and of a layout's shards must agree to rounding
        sq = torch.zeros(1, dtype=torch.float64, device=devices[key])
        if parts[key]:
            sq = torch.stack(torch._foreach_norm(parts[key], 2, dtype=torch.float64)).pow(2).sum().reshape(1)
        for group in groups[key]:
            comm.all_reduce(sq, group, "grad_norm")
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros(1, dtype=torch.float64)
    if across is not None:
        comm.all_reduce(total, across, "grad_norm")
    norm = total[0].sqrt()
    grads = [g for key in sorted(parts) for g in parts[key]]
    if max_norm > 0 and grads:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
