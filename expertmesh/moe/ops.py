"""Token dispatch and combine: the permutation around the experts.

Legend: T tokens, D model dim, K experts per token, E experts, N routed rows (kept slots).

`dispatch(x_TD, topk_idx_TK, E)` groups token rows by expert (stable: token order inside an
expert) and returns `x_sorted_ND`, `tokens_per_expert_E` and `row_map_TK`, the row of
`x_sorted_ND` that slot (t, k) went to (-1 for a dropped slot). `combine(y_sorted_ND, row_map_TK,
w_TK)` returns `out_TD = sum_k w[t, k] * y_sorted[row_map[t, k]]`, summed in k order.

These are the pure-torch reference versions; autograd differentiates them directly.
"""

from __future__ import annotations

import torch


def _check(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int) -> None:
    if x_TD.dim() != 2 or topk_idx_TK.dim() != 2 or x_TD.shape[0] != topk_idx_TK.shape[0]:
        raise ValueError(f"dispatch expects x[T,D] and topk_idx[T,K]; got {tuple(x_TD.shape)} and "
                         f"{tuple(topk_idx_TK.shape)}")
    if topk_idx_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int32 or int64, got {topk_idx_TK.dtype}")
    if topk_idx_TK.numel():
        lo, hi = int(topk_idx_TK.min()), int(topk_idx_TK.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx values must be in [-1, {num_experts - 1}]; found range [{lo}, {hi}]")


def dispatch_reference(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int):
    _check(x_TD, topk_idx_TK, num_experts)
    T, K = topk_idx_TK.shape
    flat = topk_idx_TK.reshape(-1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))  # dropped slots sort last
    order = torch.argsort(key, stable=True)
    tokens_per_expert_E = torch.bincount(flat[flat >= 0], minlength=num_experts)
    n = int(tokens_per_expert_E.sum())
    order = order[:n]
    x_sorted_ND = x_TD[order // K]
    row_map = torch.full((T * K,), -1, dtype=torch.int64, device=x_TD.device)
    row_map[order] = torch.arange(n, device=x_TD.device)
    return x_sorted_ND, tokens_per_expert_E, row_map.view(T, K)


def combine_reference(y_sorted_ND: torch.Tensor, row_map_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    if row_map_TK.shape != w_TK.shape:
        raise ValueError(f"row_map {tuple(row_map_TK.shape)} and weights {tuple(w_TK.shape)} must match")
    T, K = row_map_TK.shape
    valid_TK = row_map_TK >= 0
    out_TD = y_sorted_ND.new_zeros(T, y_sorted_ND.shape[1])
    for k in range(K):  # fixed k order: the same sum on every backend
        rows = y_sorted_ND[row_map_TK[:, k].clamp_min(0)]
        w = (w_TK[:, k] * valid_TK[:, k]).to(rows.dtype)
        out_TD = out_TD + w[:, None] * rows
    return out_TD


def dispatch(x_TD, topk_idx_TK, num_experts: int, backend: str = "reference"):
    return dispatch_reference(x_TD, topk_idx_TK, num_experts)


def combine(y_sorted_ND, row_map_TK, w_TK, backend: str = "reference"):
    return combine_reference(y_sorted_ND, row_map_TK, w_TK)
