"""SwiGLU experts with weights stored as stacked tensors, so placement can shard them by slicing.

Legend: N routed rows (grouped by expert), D model dim, F expert hidden dim, E experts.
  w1_EDF, w3_EDF: gate and up projections; w2_EFD: down projection.

All local experts run as one grouped GEMM per projection (`torch._grouped_mm`, fp32/bf16/fp16);
float64 (gradient checks), devices without it, and one or two local experts on CPU (see
`_can_group`) run a per-expert loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("expertmesh::grouped_mm", mutates_args=())
def _grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]; `offs` are the cumulative row counts (int32). An op of our own
    around torch's: torch.compile sees one opaque kernel with a fake of known shape (torch's own meta
    function accepts bf16 only), and the backward below runs on a contiguous gradient (torch's rejects
    expanded, stride-0 ones)."""
    return torch._grouped_mm(x_ND, w_EDF, offs=offs_E)


@_grouped_mm.register_fake
def _(x_ND, w_EDF, offs_E):
    return x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])


@torch.library.custom_op("expertmesh::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x_ND: torch.Tensor, grad_NF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """grad_w[e] = x[rows of e]^T @ grad[rows of e]."""
    return torch._grouped_mm(x_ND.t(), grad_NF, offs=offs_E)


@_grouped_mm_wgrad.register_fake
def _(x_ND, grad_NF, offs_E):
    return x_ND.new_empty(offs_E.shape[0], x_ND.shape[1], grad_NF.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad_NF):
    x_ND, w_EDF, offs_E = ctx.saved_tensors
    grad_NF = grad_NF.contiguous()
    grad_x = _grouped_mm(grad_NF, w_EDF.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_wgrad(x_ND, grad_NF, offs_E) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _grouped_mm(x_ND, w_EDF, offs_E)


def _can_group(x_ND: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    if x_ND.dtype not in _GROUPED_DTYPES or w_EDF.dtype != x_ND.dtype or not hasattr(torch, "_grouped_mm"):
        return False
    if x_ND.is_cuda:  # the CUDA kernel wants bf16 and 16-byte aligned rows
        return x_ND.dtype == torch.bfloat16 and w_EDF.shape[-1] % 8 == 0 and w_EDF.shape[-2] % 8 == 0
    # On CPU the grouped GEMM is a loop over groups with extra copies: it wins with many small
    # experts (64 local experts: fewer Python ops), the plain loop with one or two large ones
    # (2 local experts x 4096 rows under ep4: 4.1 s against 5.1 s of rank CPU time for 3 steps).
    return w_EDF.shape[0] > 2


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

    backend = "auto"  # the layer's moe.backend: "triton" runs the grouped GEMMs in Triton (any row count)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows of x_ND are grouped by expert, `tokens_per_expert_E[e]` rows for local expert e."""
        return compute(x_ND, tokens_per_expert_E, self.w1, self.w3, self.w2, self.backend)

    def forward_loop(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """One matmul chain per expert: the reference the grouped path is tested against."""
        return compute_loop(x_ND, tokens_per_expert_E, self.w1, self.w3, self.w2)


def compute(x_ND, tokens_per_expert_E, w1_EDF, w3_EDF, w2_EFD, backend: str = "auto") -> torch.Tensor:
    """The experts' SwiGLU on rows grouped by expert, with the weights given (this rank's experts, or
    under FSSDP the experts it holds this step: its own and the replicas it received). Rows in a lower
    precision than the weights (bf16 rows of mixed precision, fp32 weights) cast the weights to them.
    With a Triton backend the rows may run past the experts' (the zero rows Triton's dispatch appends)."""
    if x_ND.dtype != w1_EDF.dtype:
        w1_EDF, w3_EDF, w2_EFD = (w.to(x_ND.dtype) for w in (w1_EDF, w3_EDF, w2_EFD))
    if backend.startswith("triton"):
        from expertmesh.moe import triton_ops

        counts = tokens_per_expert_E.to(torch.int32)
        offs_E = torch.cumsum(counts, 0, dtype=torch.int32) - counts
        gate, up = (triton_ops.gmm_op(x_ND, w, tokens_per_expert_E, offs_E) for w in (w1_EDF, w3_EDF))
        return triton_ops.gmm_op(F.silu(gate) * up, w2_EFD, tokens_per_expert_E, offs_E)
    if _can_group(x_ND, w1_EDF):
        offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        h_NF = F.silu(grouped_mm(x_ND, w1_EDF, offs_E)) * grouped_mm(x_ND, w3_EDF, offs_E)
        return grouped_mm(h_NF, w2_EFD, offs_E)
    return compute_loop(x_ND, tokens_per_expert_E, w1_EDF, w3_EDF, w2_EFD)


def compute_loop(x_ND, tokens_per_expert_E, w1, w3, w2) -> torch.Tensor:
    outs = [x_ND.new_zeros(0, w2.shape[-1])]
    for e, x in enumerate(torch.split(x_ND, tokens_per_expert_E.tolist())):
        if x.shape[0]:
            outs.append((F.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e])
    out = torch.cat(outs)
    # With no rows at all, keep the weights and the input in the graph: the weights still get a
    # (zero) gradient, and backward still runs the all-to-all that brought the (empty) input, which
    # every rank of an expert-parallel group must join.
    return out + 0 * (w1.sum() + w3.sum() + w2.sum() + x_ND.sum()) if out.shape[0] == 0 else out
