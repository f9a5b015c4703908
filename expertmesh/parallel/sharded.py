"""Module classes that parallelism swaps in: the model's own computation, run on this rank's parts of
parameters that tensor or expert parallelism made DTensors. The model's classes stay plain tensor code;
`swap_class` replaces a module's class in place (its parameters, names and hooks are kept), so
checkpoints, FSDP and the optimizer see the same module.

Legend: N rows grouped by expert, F hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from expertmesh.layers.mlp import SwiGLU
from expertmesh.moe.experts import GroupedExperts, compute


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor parameter (the tensor itself otherwise), differentiable: its gradient
    flows back to the DTensor. The computation then runs on plain tensors and the caller owns the
    communication."""
    return t.to_local() if isinstance(t, DTensor) else t


def swap_class(module: nn.Module, cls: type) -> nn.Module:
    """Makes `module` an instance of `cls`, a subclass of its class that overrides `forward` only."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} does not derive from {type(module).__name__}")
    module.__class__ = cls
    return module


class ShardedExperts(GroupedExperts):
    """The experts on this rank's stacks: its experts under expert parallelism (Shard(0) over ep), its slice
    of F under expert tensor parallelism (the output then a partial sum), or both."""

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return compute(x_ND, tokens_per_expert_E, *(local_shard(w) for w in (self.w1, self.w3, self.w2)),
                       self.backend)


class ShardedSwiGLU(SwiGLU):
    """A SwiGLU on this rank's slice of its hidden dim (w1, w3 split by rows, w2 by columns): the output is
    this rank's partial sum (the MoE layer's shared and residual MLPs under expert tensor parallelism)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = (local_shard(lin.weight) for lin in (self.w1, self.w3, self.w2))
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
