"""Replicated data parallelism: gradient averaging over the right group per parameter, and the
global gradient-norm clip.

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

from expertmesh.dist.comm_stats import Comm


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
        for g, bucket in self.buckets:
            if g.group is None and g.divisor == 1:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([x.reshape(-1) for x in grads])
            self.comm.all_reduce(flat, g.group, g.label)
            flat.div_(g.divisor)
            offset = 0
            for p, x in zip(bucket, grads, strict=True):
                p.grad = flat[offset: offset + x.numel()].view_as(p)
                offset += x.numel()


@torch.no_grad()
def clip_grad_norm(dense: list[nn.Parameter], sharded: list[nn.Parameter], shard_group, comm: Comm,
                   max_norm: float) -> float:
    """Clips by the global norm over all parameters: dense grads are equal on every rank, sharded
    (expert-parallel) grads differ, so their squares are summed over the shard group first. Every
    rank gets the same norm and the same scale."""
    def sq(params):
        grads = [p.grad.float().pow(2).sum() for p in params if p.grad is not None]
        return torch.stack(grads).sum() if grads else torch.zeros(())

    shard_sq = sq(sharded).reshape(1).double()
    comm.all_reduce(shard_sq, shard_group, "grad_norm")
    total = float((sq(dense).double() + shard_sq[0]).sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in [*dense, *sharded]:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total
