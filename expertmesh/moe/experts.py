"""SwiGLU experts with weights stored as stacked tensors, so placement can shard them by slicing.

Legend: N routed rows, D model dim, F expert hidden dim, E experts.
  w1_EDF, w3_EDF: gate and up projections; w2_EFD: down projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1, std=std)
        nn.init.trunc_normal_(self.w3, std=std)
        nn.init.trunc_normal_(self.w2, std=out_std)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows of x_ND are grouped by expert, `tokens_per_expert_E[e]` rows for expert e."""
        counts = tokens_per_expert_E.tolist()
        outs = []
        for e, x in enumerate(torch.split(x_ND, counts)):
            if x.shape[0] == 0:
                continue
            h = F.silu(x @ self.w1[e]) * (x @ self.w3[e])
            outs.append(h @ self.w2[e])
        if not outs:
            return x_ND.new_zeros(0, self.dim) + 0 * self.w2.sum()
        return torch.cat(outs)
