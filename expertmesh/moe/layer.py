"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared expert).

Legend: B batch, S sequence, D model dim, T = B*S tokens, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.config import MoEConfig
from expertmesh.layers.mlp import SwiGLU, local
from expertmesh.moe import ops
from expertmesh.moe.experts import GroupedExperts
from expertmesh.moe.router import TopKRouter


@dataclass
class MoEStats:
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    entropy: torch.Tensor


@torch.compiler.disable
def _placed(placement, x_sorted_ND, tokens_per_expert_E, experts):
    """The placement's exchange runs eagerly between two compiled graphs: its split sizes are host values
    and its collectives go through the counting wrapper, which Dynamo would cut into many small graphs."""
    return placement(x_sorted_ND, tokens_per_expert_E, experts)


class MoELayer(nn.Module):
    """`num_experts` may differ per layer (PR-MoE's pyramid). Parallelism is attached from outside by
    `parallelize_model`: `self.placement` (expert parallelism; None runs every expert here) and
    `self.tp_sync` (expert tensor parallelism, see parallel/tensor.py; None without it)."""

    def __init__(self, dim: int, cfg: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__()
        E = num_experts or cfg.num_experts
        self.num_experts, self.backend = E, cfg.backend
        self.router = TopKRouter(dim, E, cfg.top_k, cfg.score_func, cfg.norm_topk, cfg.capacity_factor,
                                 cfg.bias_update_rate, cfg.n_groups, cfg.topk_groups, cfg.routed_scaling_factor)
        self.experts = GroupedExperts(E, dim, cfg.expert_dim)
        self.shared = SwiGLU(dim, cfg.shared_hidden) if cfg.shared_hidden else None
        # Qwen2-MoE: the shared expert's output is scaled per token by sigmoid(x . w)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_gate else None
        # PR-MoE (residual MoE): out = c0 * experts(x) + c1 * mlp(x), c = softmax(coefficient(x)).
        self.residual_mlp = SwiGLU(dim, cfg.expert_dim) if cfg.residual else None
        self.coefficient = nn.Linear(dim, 2, bias=False) if cfg.residual else None
        self.placement = None
        self.tp_sync = None

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.router.gate.weight, std=std)
        self.router.expert_bias.zero_()
        self.experts.init_weights(std, out_std)
        for mlp in (self.shared, self.residual_mlp):
            if mlp is not None:
                mlp.init_weights(std, out_std)
        for gate in (self.coefficient, self.shared_gate):
            if gate is not None:
                nn.init.trunc_normal_(gate.weight, std=std)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        tp = self.tp_sync
        xr_TD, xe_TD = (tp.router_input(x_TD), tp.expert_input(x_TD)) if tp else (x_TD, x_TD)
        r = self.router(xr_TD)
        if torch.is_autocast_enabled(x_TD.device.type):  # bf16 rows through dispatch, all-to-all and experts
            xe_TD = xe_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        topk_w_TK = tp(r.topk_w_TK) if tp else r.topk_w_TK
        x_sorted_ND, tokens_per_expert_E, row_map_TK = ops.dispatch(xe_TD, r.topk_idx_TK, self.num_experts,
                                                                    self.backend)
        if self.placement is None:
            y_sorted_ND = self.experts(x_sorted_ND, tokens_per_expert_E)
        else:
            y_sorted_ND = _placed(self.placement, x_sorted_ND, tokens_per_expert_E, self.experts)
        out_TD = ops.combine(y_sorted_ND, row_map_TK, topk_w_TK, self.backend)
        if self.residual_mlp is not None:
            c_T2 = F.linear(xr_TD, local(self.coefficient.weight)).softmax(dim=-1)
            c_T2 = tp(c_T2) if tp else c_T2
            out_TD = out_TD * c_T2[:, :1] + self.residual_mlp.forward_local(xe_TD) * c_T2[:, 1:]
        if self.shared is not None:
            shared_TD = self.shared.forward_local(xe_TD)
            if self.shared_gate is not None:
                g_T1 = F.linear(xr_TD, local(self.shared_gate.weight)).sigmoid()
                shared_TD = shared_TD * (tp(g_T1) if tp else g_T1)
            out_TD = out_TD + shared_TD
        stats = MoEStats(r.aux_loss, r.z_loss, r.tokens_per_expert_E, r.dropped, r.entropy)
        return out_TD.view(B, S, D), stats
