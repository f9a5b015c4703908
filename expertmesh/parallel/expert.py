"""Expert parallelism's token exchange pieces: experts split evenly over the mesh's `ep` dim, tokens
moved by all-to-all. The placement that uses them, for expert parallelism and FSSDP alike, is
parallel/fssdp.py's `ExpertPlacement` (expert parallelism is its plan without replicas).

Legend: N rows routed by this rank (grouped by global expert), E experts, L = E / ep local experts,
R rows this rank receives, D model dim.

One MoE call, for a rank of an ep group of size P:
  1. counts: all-to-all of the rows per (destination, expert), so each rank learns how many rows
     every source sends to each expert it holds;
  2. rows: uneven all_to_all_single; the rows for rank p leave as one contiguous block (in expert
     order rank p's experts are contiguous; moved owners or replicas need one gather first);
  3. received rows arrive source-major ([source][held expert]); a local permutation
     (`source_to_expert_major`) makes them expert-major for one grouped expert GEMM;
  4. the reverse: un-permute, all-to-all back with the splits swapped.
Both all-to-alls are autograd functions whose backward is the opposite all-to-all. Every rank
takes part in both exchanges even with zero rows to send or receive, so none waits on another.
"""

from __future__ import annotations

import torch

from expertmesh.dist.comm_stats import Comm


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group, comm, label):
        ctx.splits, ctx.group, ctx.comm, ctx.label = (out_splits, in_splits), group, comm, label
        out = x_ND.new_empty(sum(out_splits), x_ND.shape[1])
        comm.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group, label)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(in_splits), grad_out.shape[1])
        ctx.comm.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, ctx.group, ctx.label)
        return grad_in, None, None, None, None, None


def all_to_all(x_ND, out_splits: list[int], in_splits: list[int], group, comm: Comm, label: str = "ep"):
    """Autograd-aware uneven all-to-all: sends in_splits[p] rows to rank p, receives out_splits[p] from it."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group, comm, label)


def source_to_expert_major(recv_counts_PL: torch.Tensor, total: int) -> torch.Tensor:
    """Index that reorders rows laid out [source p][local expert l] into [local expert l][source p];
    `total` is the number of rows (known on the host: no sync), the index is on the counts' device."""
    P, L = recv_counts_PL.shape
    counts = recv_counts_PL.reshape(-1)
    src_start_PL = (torch.cumsum(counts, 0) - counts).view(P, L)
    blocks = recv_counts_PL.t().reshape(-1)  # block sizes in expert-major order
    starts = src_start_PL.t().reshape(-1)
    dst_start = torch.cumsum(blocks, 0) - blocks
    arange = torch.arange(total, device=recv_counts_PL.device)
    return torch.repeat_interleave(starts - dst_start, blocks, output_size=total) + arange
