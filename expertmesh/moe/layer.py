"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared expert).

Legend: B batch, S sequence, D model dim, T = B*S tokens, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from expertmesh.config import MoEConfig
from expertmesh.layers.mlp import SwiGLU
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


class LocalDispatcher(nn.Module):
    """The layer's token dispatcher when every expert lives on this rank: the rows, grouped by expert, go
    straight to the experts. Expert parallelism and FSSDP swap in one that moves the rows to the ranks that
    hold their experts and brings the outputs back (parallel/fssdp.py)."""

    def forward(self, x_sorted_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: nn.Module):
        return experts(x_sorted_ND, tokens_per_expert_E)


class MoELayer(nn.Module):
    """`num_experts` may differ per layer (PR-MoE's pyramid). Plain tensor code: parallelism is attached from
    outside by `parallelize_model`, which swaps `self.dispatcher` (expert parallelism, FSSDP) and attaches
    expert tensor parallelism's hooks and sharded modules (parallel/tensor.py)."""

    def __init__(self, dim: int, cfg: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__()
        E = num_experts or cfg.num_experts
        self.num_experts, self.backend = E, cfg.backend
        self.router = TopKRouter(dim, E, cfg.top_k, cfg.score_func, cfg.norm_topk, cfg.capacity_factor,
                                 cfg.bias_update_rate, cfg.n_groups, cfg.topk_groups, cfg.routed_scaling_factor)
        self.experts = GroupedExperts(E, dim, cfg.expert_dim)
        self.experts.backend = cfg.backend
        self.shared = SwiGLU(dim, cfg.shared_hidden) if cfg.shared_hidden else None
        # Qwen2-MoE: the shared expert's output is scaled per token by sigmoid(x . w)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_gate else None
        # PR-MoE (residual MoE): out = c0 * experts(x) + c1 * mlp(x), c = softmax(coefficient(x)).
        self.residual_mlp = SwiGLU(dim, cfg.expert_dim) if cfg.residual else None
        self.coefficient = nn.Linear(dim, 2, bias=False) if cfg.residual else None
        self.dispatcher = LocalDispatcher()

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
        r = self.router(x_TD)
        xe_TD = x_TD
        if torch.is_autocast_enabled(x_TD.device.type):  # bf16 rows through dispatch, all-to-all and experts
            xe_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        if self.backend.startswith("triton"):
            out_TD = self._triton(xe_TD, r)
        else:
            x_sorted_ND, tokens_per_expert_E, row_map_TK = ops.dispatch(xe_TD, r.topk_idx_TK, self.num_experts,
                                                                        self.backend)
            y_sorted_ND = self.dispatcher(x_sorted_ND, tokens_per_expert_E, self.experts)
            out_TD = ops.combine(y_sorted_ND, row_map_TK, r.topk_w_TK, self.backend)
        if self.residual_mlp is not None:
            c_T2 = self.coefficient(x_TD).softmax(dim=-1)
            out_TD = out_TD * c_T2[:, :1] + self.residual_mlp(xe_TD) * c_T2[:, 1:]
        if self.shared is not None:
            shared_TD = self.shared(xe_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * self.shared_gate(x_TD).sigmoid()
            out_TD = out_TD + shared_TD
        stats = MoEStats(r.aux_loss, r.z_loss, r.tokens_per_expert_E, r.dropped, r.entropy)
        return out_TD.view(B, S, D), stats

    def _triton(self, xe_TD: torch.Tensor, r) -> torch.Tensor:
        """Dispatch, experts and combine through the Triton kernels (moe/triton_ops.py). Local experts take the
        dispatched matrix as it is (T*K rows, the routed ones first: no host sync), or, with `triton_fused`, the
        whole layer is one kernel over the tokens; a dispatcher that moves rows to other ranks sends only the
        routed ones (its split sizes, host values anyway, say how many) and returns those."""
        from expertmesh.moe import triton_ops

        xs, counts, row_map, slot_of_row, offsets = ops.dispatch_triton(xe_TD, r.topk_idx_TK, self.num_experts)
        w_TK = r.topk_w_TK.float()
        if isinstance(self.dispatcher, LocalDispatcher) and self.backend == "triton_fused":
            w1, w3, w2 = (getattr(self.experts, n).to(xe_TD.dtype) for n in ("w1", "w3", "w2"))
            return triton_ops.fused_moe_op(xe_TD, row_map, slot_of_row, w_TK, w1, w3, w2, counts,
                                           offsets).to(xe_TD.dtype)
        return triton_ops.combine(self.dispatcher(xs, counts, self.experts), row_map, w_TK)
