"""Top-k router: scores, expert choice, auxiliary losses, capacity dropping, routing statistics.

Legend: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    topk_idx_TK: torch.Tensor  # int64 expert ids; -1 marks a slot dropped by capacity
    topk_w_TK: torch.Tensor  # combine weights, fp32 (0 where dropped)
    aux_loss: torch.Tensor  # Switch/GShard load-balance loss, E * sum_e f_e * P_e
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2)
    tokens_per_expert_E: torch.Tensor  # int64 counts after dropping
    dropped: torch.Tensor  # int64 scalar, slots dropped by capacity
    entropy: torch.Tensor  # mean per-token entropy of the routing distribution (nats)


class TopKRouter(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        norm_topk: bool = True,
        capacity_factor: float = 0.0,
        bias_update_rate: float = 0.0,
        n_groups: int = 1,
        topk_groups: int = 1,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func={score_func!r} must be 'softmax' or 'sigmoid'")
        self.num_experts, self.top_k = num_experts, top_k
        if num_experts % n_groups or not 1 <= topk_groups <= n_groups:
            raise ValueError(f"n_groups={n_groups} must divide num_experts={num_experts} and "
                             f"topk_groups={topk_groups} must be in [1, n_groups]")
        self.score_func, self.norm_topk, self.capacity_factor = score_func, norm_topk, capacity_factor
        self.bias_update_rate, self.n_groups, self.topk_groups = bias_update_rate, n_groups, topk_groups
        self.scaling_factor = scaling_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)
        # Aux-loss-free balancing: added to the scores for choosing experts only, never to the weights.
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """After a step, nudge under-loaded experts up and over-loaded ones down (global counts)."""
        if self.bias_update_rate > 0:
            load = load_E.to(self.expert_bias.dtype)
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def _limit_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        """Masks every expert outside each token's best `topk_groups` groups (group score: the sum of
        its two best experts, or its best one when groups have a single expert)."""
        T, E = select_TE.shape
        grouped_TGe = select_TE.view(T, self.n_groups, E // self.n_groups)
        best = min(2, grouped_TGe.shape[-1])
        group_score_TG = grouped_TGe.topk(best, dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(self.topk_groups, dim=-1).indices, True)
        return grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        """Logits, scores and combine weights in fp32 whatever the compute dtype (autocast, bf16 weights):
        near-ties must pick the experts that Hugging Face's fp32 routing picks."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        # the bias is zero unless balancing moves it or a checkpoint brought it (DeepSeek-V3's correction bias)
        select_TE = scores_TE.detach() + self.expert_bias
        if self.n_groups > 1:
            select_TE = self._limit_groups(select_TE)
        topk_idx_TK = select_TE.topk(self.top_k, dim=-1).indices
        topk_s_TK = scores_TE.gather(1, topk_idx_TK)
        topk_w_TK = topk_s_TK
        if self.norm_topk and self.top_k > 1:
            topk_w_TK = topk_s_TK / topk_s_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.scaling_factor != 1.0:
            topk_w_TK = topk_w_TK * self.scaling_factor

        probs_TE = scores_TE if self.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        aux_loss = self._load_balance_loss(probs_TE, topk_idx_TK)
        z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean().detach()

        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        if self.capacity_factor > 0:
            topk_idx_TK, dropped = self._apply_capacity(topk_idx_TK, topk_s_TK.detach())
            topk_w_TK = topk_w_TK * (topk_idx_TK >= 0)
        tokens_per_expert_E = count_per_expert(topk_idx_TK, self.num_experts)
        return RouterOutput(
            topk_idx_TK, topk_w_TK, aux_loss, z_loss, tokens_per_expert_E, dropped, entropy
        )

    def _load_balance_loss(self, probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        T, E = probs_TE.shape
        counts_E = count_per_expert(topk_idx_TK, E).to(probs_TE.dtype)
        frac_E = counts_E / max(T * self.top_k, 1)
        return E * (frac_E * probs_TE.mean(dim=0)).sum()

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _apply_capacity(self, topk_idx_TK: torch.Tensor, topk_s_TK: torch.Tensor):
        """Keeps, per expert, the `capacity` highest-scored slots (ties: earlier token first)."""
        T, K = topk_idx_TK.shape
        cap = self.capacity(T)
        flat_idx = topk_idx_TK.reshape(-1)
        order = torch.argsort(-topk_s_TK.reshape(-1), stable=True)
        onehot = F.one_hot(flat_idx[order], self.num_experts)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # slot's rank within its expert
        keep_sorted = position < cap
        keep = torch.empty_like(keep_sorted)
        keep[order] = keep_sorted
        kept_idx = torch.where(keep, flat_idx, torch.full_like(flat_idx, -1)).view(T, K)
        return kept_idx, (~keep).sum()


def count_per_expert(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert, ids of -1 (dropped slots) not counted. A scatter-add of fixed size: bincount and
    boolean indexing would each wait for the device to learn an output size."""
    flat = idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=idx.device)
    return counts.scatter_add_(0, flat.clamp_min(0), (flat >= 0).to(torch.int64))
