"""Dense SwiGLU feed-forward block, and `local`, which parallel-aware forwards use on weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight that tensor/expert parallelism made a DTensor; the tensor itself
    otherwise. The computation then runs on plain tensors and the caller owns the communication."""
    return t.to_local() if isinstance(t, DTensor) else t


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=std)
        nn.init.trunc_normal_(self.w3.weight, std=std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """The same on this rank's weight slices (inside a MoE layer under expert tensor parallelism
        the result is this rank's partial sum)."""
        w1, w3, w2 = (local(lin.weight) for lin in (self.w1, self.w3, self.w2))
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
