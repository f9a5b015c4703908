"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared expert).

Legend: B batch, S sequence, D model dim, T = B*S tokens, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from expertmesh.config import MoEConfig
from expertmesh.moe import ops
from expertmesh.moe.experts import GroupedExperts
from expertmesh.moe.router import TopKRouter
from expertmesh.models.mlp import SwiGLU


@dataclass
class MoEStats:
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    entropy: torch.Tensor


class MoELayer(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.backend = cfg.num_experts, cfg.backend
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.score_func, cfg.norm_topk,
                                 cfg.capacity_factor)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_dim)
        self.shared = SwiGLU(dim, cfg.shared_experts * cfg.expert_dim) if cfg.shared_experts else None

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.router.gate.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        r = self.router(x_TD)
        x_sorted_ND, tokens_per_expert_E, row_map_TK = ops.dispatch(x_TD, r.topk_idx_TK, self.num_experts,
                                                                    self.backend)
        y_sorted_ND = self.experts(x_sorted_ND, tokens_per_expert_E)
        out_TD = ops.combine(y_sorted_ND, row_map_TK, r.topk_w_TK, self.backend)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        stats = MoEStats(r.aux_loss, r.z_loss, r.tokens_per_expert_E, r.dropped, r.entropy)
        return out_TD.view(B, S, D), stats
