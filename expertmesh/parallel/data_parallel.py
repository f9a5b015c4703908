"""Replicated data parallelism: average gradients across a group after backward.

Gradients are packed into flat buckets (one all-reduce per ~`bucket_mb` MiB rather than one per
parameter) and averaged. Every rank iterates parameters in the same registration order, so the
buckets line up across ranks — a different order would sum unrelated gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from expertmesh.dist.comm_stats import Comm


class GradAverager:
    def __init__(self, model: nn.Module, group, comm: Comm, label: str = "dense_dp", bucket_mb: float = 25.0):
        self.group, self.comm, self.label = group, comm, label
        self.world = dist.get_world_size(group) if group is not None else 1
        params = [p for p in model.parameters() if p.requires_grad]
        limit = int(bucket_mb * 2**20)
        self.buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            if self.buckets[-1] and size + nbytes > limit:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes

    @torch.no_grad()
    def average(self) -> None:
        if self.group is None:
            return
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.comm.all_reduce(flat, self.group, self.label)
            flat.div_(self.world)
            offset = 0
            for p, g in zip(bucket, grads, strict=True):
                n = g.numel()
                p.grad = flat[offset: offset + n].view_as(p)
                offset += n
