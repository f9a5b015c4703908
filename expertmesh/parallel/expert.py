"""Expert parallelism: experts split evenly over the mesh's `ep` dim, tokens moved by all-to-all.

Legend: N rows routed by this rank (grouped by global expert), E experts, L = E / ep local experts,
R rows this rank receives, D model dim.

One MoE call, for a rank of an ep group of size P:
  1. counts: all-to-all of tokens_per_expert, so each rank learns how many rows every source
     sends to each of its local experts (recv_counts[P, L]);
  2. rows: uneven all_to_all_single; rank p's experts are contiguous in the global order, so the
     rows for rank p are one contiguous block of x_sorted (sizes from the counts);
  3. received rows arrive source-major ([source][local expert]); a local permutation makes them
     expert-major ([local expert][source]) for one grouped expert GEMM;
  4. the reverse: un-permute, all-to-all back with the splits swapped.
Both all-to-alls are autograd functions whose backward is the opposite all-to-all. Every rank
takes part in both exchanges even with zero rows to send or receive, so none waits on another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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


class ExpertParallel:
    """Placement of one MoE layer's experts over an ep group; called by MoELayer as `placement`."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup, comm: Comm) -> None:
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"ep={self.size} does not divide num_experts={num_experts}")
        self.num_experts, self.local = num_experts, num_experts // self.size
        self.group, self.comm = group, comm

    def local_slice(self) -> slice:
        return slice(self.rank * self.local, (self.rank + 1) * self.local)

    def __call__(self, x_sorted_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts) -> torch.Tensor:
        P, L = self.size, self.local
        send_PL = tokens_per_expert_E.detach().to(torch.int64).view(P, L)
        recv_PL = torch.empty_like(send_PL)
        self.comm.all_to_all_single(recv_PL, send_PL, None, None, self.group, "ep")
        in_splits, out_splits = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()  # the one host sync

        x_recv = all_to_all(x_sorted_ND, out_splits, in_splits, self.group, self.comm)
        perm = source_to_expert_major(recv_PL, x_recv.shape[0])
        y_local = experts(x_recv[perm], recv_PL.sum(0))
        y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local) if y_local.shape[0] else y_local
        return all_to_all(y_recv, in_splits, out_splits, self.group, self.comm)
