"""Token dispatch and combine: the permutation around the experts.

Legend: T tokens, D model dim, K experts per token, E experts, N routed rows (kept slots).

`dispatch(x_TD, topk_idx_TK, E)` groups token rows by expert (stable: token order inside an
expert) and returns `x_sorted_ND`, `tokens_per_expert_E` and `row_map_TK`, the row of
`x_sorted_ND` that slot (t, k) went to (-1 for a dropped slot). `combine(y_sorted_ND, row_map_TK,
w_TK)` returns `out_TD = sum_k w[t, k] * y_sorted[row_map[t, k]]`, summed in k order.

Implementations behind one API: the pure-torch reference below (kept for tests and as the
`moe.backend = "reference"` fallback), the fused ops of `expertmesh._C` registered as
`expertmesh::moe_dispatch` / `expertmesh::moe_combine` (C++ on CPU, CUDA on GPU), given fake
tensors and autograd here, and the Triton kernels of moe/triton_ops.py (`moe.backend = "triton"`).

Combine weights are fp32 (fp64 for fp64 rows) whatever the rows' dtype: the router computes them in
fp32, as Hugging Face's DeepSeek-V3 and Qwen MoE do, and every backend multiplies and accumulates in
fp32, rounding only the output row to the rows' dtype. The CUDA kernels check row maps on the device
only with EXPERTMESH_MOE_CHECKS=1 (reading the flag back is a host sync; our row maps are in range by
construction).
"""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton: its interpreter runs moe.backend="triton" here
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (moe/triton_ops.py)

try:
    import expertmesh._C  # noqa: F401  (registers torch.ops.expertmesh.*)

    HAVE_EXTENSION = True
except ImportError:  # an install without a C++ compiler: only the reference backend works
    HAVE_EXTENSION = False


def _check(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int, values: bool = True) -> None:
    """Shapes and dtypes; with `values`, the ids' range too (reading it back is a host sync)."""
    if x_TD.dim() != 2 or topk_idx_TK.dim() != 2 or x_TD.shape[0] != topk_idx_TK.shape[0]:
        raise ValueError(f"dispatch expects x[T,D] and topk_idx[T,K]; got {tuple(x_TD.shape)} and "
                         f"{tuple(topk_idx_TK.shape)}")
    if topk_idx_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int32 or int64, got {topk_idx_TK.dtype}")
    if values and topk_idx_TK.numel():
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
    acc = accumulation_dtype(y_sorted_ND.dtype)
    valid_TK = row_map_TK >= 0
    out_TD = y_sorted_ND.new_zeros(T, y_sorted_ND.shape[1], dtype=acc)
    if y_sorted_ND.shape[0] == 0:  # every slot dropped: nothing to gather (and nothing to index)
        return (out_TD + 0 * w_TK.sum()).to(y_sorted_ND.dtype)
    for k in range(K):  # fixed k order: the same sum on every backend
        rows = y_sorted_ND[row_map_TK[:, k].clamp_min(0)].to(acc)
        w = (w_TK[:, k] * valid_TK[:, k]).to(acc)
        out_TD = out_TD + w[:, None] * rows
    return out_TD.to(y_sorted_ND.dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What combine multiplies and sums in, and the dtype of its weights: fp64 for fp64 rows, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32



# ---------------------------------------------------------------------------------------
# Fused ops: fake tensors (for torch.compile / export) and autograd


if HAVE_EXTENSION:
    _ops = torch.ops.expertmesh

    @torch.library.register_fake("expertmesh::moe_dispatch")
    def _dispatch_fake(x, topk_idx, num_experts):
        n = torch.library.get_ctx().new_dynamic_size()
        T, K = topk_idx.shape
        return (x.new_empty(n, x.shape[1]), topk_idx.new_empty(num_experts, dtype=torch.int64),
                topk_idx.new_empty(T, K, dtype=torch.int64))

    @torch.library.register_fake("expertmesh::moe_dispatch_backward")
    def _dispatch_backward_fake(grad_x_sorted, row_map):
        return grad_x_sorted.new_empty(row_map.shape[0], grad_x_sorted.shape[1])

    @torch.library.register_fake("expertmesh::moe_combine")
    def _combine_fake(y_sorted, row_map, weights):
        return y_sorted.new_empty(row_map.shape[0], y_sorted.shape[1])

    @torch.library.register_fake("expertmesh::moe_combine_backward")
    def _combine_backward_fake(grad_out, y_sorted, row_map, weights):
        return torch.empty_like(y_sorted), torch.empty_like(weights)

    def _dispatch_setup(ctx, inputs, output):
        ctx.save_for_backward(output[2])

    def _dispatch_backward(ctx, grad_sorted, _grad_counts, _grad_row_map):
        (row_map,) = ctx.saved_tensors
        return _ops.moe_dispatch_backward(grad_sorted.contiguous(), row_map), None, None

    def _combine_setup(ctx, inputs, output):
        y_sorted, row_map, weights = inputs
        ctx.save_for_backward(y_sorted, row_map, weights)

    def _combine_backward(ctx, grad_out):
        y_sorted, row_map, weights = ctx.saved_tensors
        grad_y, grad_w = _ops.moe_combine_backward(grad_out.contiguous(), y_sorted, row_map, weights)
        return grad_y, None, grad_w

    torch.library.register_autograd("expertmesh::moe_dispatch", _dispatch_backward, setup_context=_dispatch_setup)
    torch.library.register_autograd("expertmesh::moe_combine", _combine_backward, setup_context=_combine_setup)


@functools.cache
def cuda_ops_available() -> bool:
    """The CUDA kernels are registered and one of them runs on this GPU (a build without a kernel image or
    PTX for its architecture registers them all the same, and fails at the first launch)."""
    if not (HAVE_EXTENSION and torch.cuda.is_available()):
        return False
    if not torch._C._dispatch_has_kernel_for_dispatch_key("expertmesh::moe_dispatch", "CUDA"):
        return False
    try:
        x = torch.ones(2, 4, device="cuda")
        xs, _, row_map = torch.ops.expertmesh.moe_dispatch(x, torch.zeros(2, 1, dtype=torch.int64, device="cuda"), 1)
        torch.ops.expertmesh.moe_combine(xs, row_map, torch.ones(2, 1, device="cuda"))
        torch.cuda.synchronize()
    except RuntimeError as err:  # "no kernel image is available for execution on the device"
        import logging

        logging.getLogger(__name__).warning("expertmesh._C's CUDA kernels do not run on %s: %s",
                                            torch.cuda.get_device_name(), str(err).splitlines()[0])
        return False
    return True


@functools.cache
def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> on GPU the Triton kernels (their source is proven on CPU by Triton's interpreter; the CUDA C++
    kernels have never run: no GPU has measured either yet), else the CUDA kernels; C++ on CPU; else the
    reference. 'triton' on a CPU runs the kernels in Triton's interpreter (slow: for proofs)."""
    if backend == "reference":
        return backend
    if backend in ("triton", "triton_fused"):
        if not triton_available():
            raise RuntimeError(f"moe.backend={backend!r} needs the triton package (pip install triton; the dev "
                               "extra has it)")
        return backend
    if backend in ("cpp", "cuda") and not HAVE_EXTENSION:
        raise RuntimeError(f"moe.backend={backend!r} needs expertmesh._C, which is not built "
                           "(reinstall with a C++ compiler, or use moe.backend='reference')")
    if backend == "cuda" and not cuda_ops_available():
        raise RuntimeError("moe.backend='cuda' but expertmesh._C has no CUDA kernels or no GPU is visible")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "cuda" if cuda_ops_available() else "reference"
        return "cpp" if HAVE_EXTENSION else "reference"
    return backend


def dispatch(x_TD, topk_idx_TK, num_experts: int, backend: str = "auto"):
    """-> (x_sorted_ND, tokens_per_expert_E, row_map_TK); see the module docstring. The Triton ops return T*K rows,
    the N routed ones first (moe/triton_ops.py: no host sync); use `dispatch_triton` for all they return."""
    b = resolve_backend(backend, x_TD.device)
    if b == "reference":
        return dispatch_reference(x_TD, topk_idx_TK, num_experts)
    if b.startswith("triton"):
        return dispatch_triton(x_TD, topk_idx_TK, num_experts)[:3]
    return torch.ops.expertmesh.moe_dispatch(x_TD, topk_idx_TK, num_experts)


def dispatch_triton(x_TD, topk_idx_TK, num_experts: int):
    """-> (x_sorted [T*K, D], tokens_per_expert_E, row_map_TK, slot_of_row, offsets_E): moe/triton_ops.py."""
    from expertmesh.moe import triton_ops

    # the ids' range only with EXPERTMESH_MOE_CHECKS=1 (a host sync; the kernels drop an id outside [0, E))
    _check(x_TD, topk_idx_TK, num_experts, values=os.environ.get("EXPERTMESH_MOE_CHECKS") == "1")
    return triton_ops.dispatch(x_TD, topk_idx_TK, num_experts)


def combine(y_sorted_ND, row_map_TK, w_TK, backend: str = "auto"):
    """-> out_TD = sum_k w_TK[t, k] * y_sorted_ND[row_map_TK[t, k]]."""
    b = resolve_backend(backend, y_sorted_ND.device)
    if b == "reference":
        return combine_reference(y_sorted_ND, row_map_TK, w_TK)
    w_TK = w_TK.to(accumulation_dtype(y_sorted_ND.dtype))
    if b.startswith("triton"):
        from expertmesh.moe import triton_ops

        return triton_ops.combine(y_sorted_ND, row_map_TK, w_TK.float())
    return torch.ops.expertmesh.moe_combine(y_sorted_ND, row_map_TK, w_TK)
