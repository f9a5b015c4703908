"""Tensor parallelism: DTensor plans applied to the model from outside with `parallelize_module`.

Dense parts follow the Megatron layout:
  attention   wq, wk, wv column-wise (each rank a slice of the heads), wo row-wise
  dense MLP   w1, w3 column-wise, w2 row-wise
  embedding   vocab-parallel (row-wise over the vocabulary) or replicated (`parallel.vocab_parallel`)
  output      vocab-parallel (column-wise, logits gathered) or replicated
  norms       sequence-parallel when `parallel.sequence_parallel`: the residual stream between the
              parallel regions is split along the sequence, so the all-reduce of a row-wise layer
              becomes a reduce-scatter and the next region starts with an all-gather.

MoE layers get expert tensor parallelism (`ExpertTensorParallel`): every expert's hidden
dimension F is split over tp (w1, w3 by columns, w2 by rows), and so are the shared expert and
the PR-MoE residual MLP. The router runs replicated on the full tokens, so every tp rank routes
identically and the expert-parallel all-to-all (if any) runs inside each tp coordinate.
Each rank's routed, shared and residual outputs are partial sums over its F slice; they are summed
once at the layer's output (all-reduce, or reduce-scatter to the sequence shards). In backward the
gradients of what the replicated modules (router, PR-MoE coefficient, shared-expert gate) hand to
those partial sums are partial too and are all-reduced (T x K floats for the combine weights), so
they get the same gradient on every tp rank; their input's gradient is scaled by 1/tp, and the
layer input's whole gradient is summed over tp once at the layer's boundary (all-reduce, or the
reduce-scatter back to the sequence shards). The layer's tp traffic equals a dense MLP's.

Everything is attached from outside the model: forward hooks, DTensor plans, and module classes
swapped in (parallel/sharded.py) that run the model's computation on this rank's shards.

Legend: B batch, S sequence, D model dim, T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from expertmesh.config import ParallelConfig
from expertmesh.dist.comm_stats import Comm
from expertmesh.models.transformer import LatentAttention
from expertmesh.moe.layer import MoELayer
from expertmesh.parallel.sharded import ShardedExperts, ShardedSwiGLU, local_shard, swap_class


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the tp group (Megatron's `f`)."""

    @staticmethod
    def forward(ctx, x, group, comm):
        ctx.group, ctx.comm = group, comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.comm.all_reduce(grad, ctx.group, "tp")
        return grad, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sums over the tp group; the gradient of each rank's part is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x, group, comm):
        ctx.group, ctx.comm = group, comm
        out = x.contiguous().clone()
        comm.all_reduce(out, group, "tp")
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.comm.all_reduce(grad, ctx.group, "tp")
        return grad, None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _SumGradOfColumns(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of the last columns (from `start` on) over tp."""

    @staticmethod
    def forward(ctx, x, start, group, comm):
        ctx.start, ctx.group, ctx.comm = start, group, comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        part = grad[..., ctx.start:].contiguous()
        ctx.comm.all_reduce(part, ctx.group, "tp")
        grad[..., ctx.start:] = part
        return grad, None, None, None


class TPGroup:
    """A tensor-parallel group and the gradient rules that the hooks and swapped modules apply on it."""

    def __init__(self, group, comm: Comm) -> None:
        self.group, self.comm = group, comm
        self.size = torch.distributed.get_world_size(group)

    def sum_grad(self, t: torch.Tensor) -> torch.Tensor:
        """`t` itself; its gradient, which each rank sees only in part, summed over tp."""
        return _SumGradOverTP.apply(t, self.group, self.comm)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` summed (e.g. the squares of a norm over heads held by different ranks)."""
        return _AllReduceSum.apply(t, self.group, self.comm)

    def scale_grad(self, t: torch.Tensor) -> torch.Tensor:
        """`t` itself; its (whole) gradient scaled by 1/tp, to be summed over tp once later."""
        return _ScaleGrad.apply(t, 1.0 / self.size)

    def sum_grad_columns(self, t: torch.Tensor, start: int) -> torch.Tensor:
        return _SumGradOfColumns.apply(t, start, self.group, self.comm)


class HeadNorm(nn.RMSNorm):
    """Per-head QK-norm under tensor parallelism: the weight is whole on every rank and read by this rank's
    heads only, so its gradient is summed over tp (`tp` is set when the class is swapped in)."""

    tp: TPGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.tp.sum_grad(self.weight), self.eps)


class WidthShardedNorm(nn.RMSNorm):
    """QK-norm over the whole projection while each rank holds some of its heads (the weight a Shard(0)
    DTensor): the squares are summed over tp and divided by the full width."""

    tp: TPGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = self.tp.sum(x.float().square().sum(-1, keepdim=True)) / self.normalized_shape[0]
        return (x.float() * torch.rsqrt(ms + self.eps)).type_as(x) * local_shard(self.weight)


def _replicated_beside_partial(module: nn.Module, tp: TPGroup, output=None) -> None:
    """Hooks for a replicated module inside an expert-tensor-parallel MoE layer whose output meets the
    ranks' partial sums: its input's gradient scaled by 1/tp (see the module docstring), its output's
    gradient summed over tp. `output(out, fn)` applies `fn` to the part of the output meeting them."""
    output = output or (lambda out, fn: fn(out))
    module.register_forward_pre_hook(lambda _m, args: (tp.scale_grad(args[0]), *args[1:]))
    module.register_forward_hook(lambda _m, _args, out: output(out, tp.sum_grad))


def _combine_weights(out, fn):
    out.topk_w_TK = fn(out.topk_w_TK)
    return out


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placements) -> None:
    param = getattr(module, name)
    setattr(module, name, nn.Parameter(distribute_tensor(param, mesh, placements, src_data_rank=None)))


class ExpertTensorParallel(ParallelStyle):
    """Expert tensor parallelism for one MoELayer (see the module docstring)."""

    def __init__(self, sequence_parallel: bool, comm: Comm) -> None:
        super().__init__()
        self.sequence_parallel, self.comm = sequence_parallel, comm

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoELayer):
            raise TypeError(f"ExpertTensorParallel applies to MoELayer, got {type(module).__name__}")
        experts = swap_class(module.experts, ShardedExperts)
        _distribute(experts, "w1", device_mesh, [Shard(2)])
        _distribute(experts, "w3", device_mesh, [Shard(2)])
        _distribute(experts, "w2", device_mesh, [Shard(1)])
        for mlp in (module.shared, module.residual_mlp):
            if mlp is not None:
                swap_class(mlp, ShardedSwiGLU)
                _distribute(mlp.w1, "weight", device_mesh, [Shard(0)])
                _distribute(mlp.w3, "weight", device_mesh, [Shard(0)])
                _distribute(mlp.w2, "weight", device_mesh, [Shard(1)])
        seq, tp = self.sequence_parallel, TPGroup(device_mesh.get_group(), self.comm)
        # the router and the gates stay replicated, plain tensors: every rank computes them whole
        _replicated_beside_partial(module.router, tp, _combine_weights)
        for gate in (module.coefficient, module.shared_gate):
            if gate is not None:
                _replicated_beside_partial(gate, tp)

        def gather_input(_mod, args):
            x = args[0]
            if isinstance(x, DTensor):  # sequence-parallel input: gather the sequence; its gradient, a partial
                # sum per rank, is reduce-scattered back to the sequence shards
                x = x.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            else:  # its gradient summed over tp here, once
                x = tp.sum_grad(x)
            return (x, *args[1:])

        def reduce_output(_mod, _args, output):
            out, stats = output
            partial = DTensor.from_local(out, device_mesh, [Partial()], run_check=False)
            out = partial.redistribute(device_mesh, [Shard(1)] if seq else [Replicate()]).to_local()
            return out, stats

        module.register_forward_pre_hook(gather_input)
        module.register_forward_hook(reduce_output)
        return module


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, p: ParallelConfig, comm: Comm) -> None:
    """Parallelizes `model` (a Transformer, on any device including meta) in place over `tp_mesh`."""
    seq = p.sequence_parallel
    stream = Shard(1) if seq else Replicate()  # layout of the residual stream between blocks
    top: dict[str, ParallelStyle] = {}
    if p.vocab_parallel:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
        top["output"] = ColwiseParallel(input_layouts=stream, output_layouts=Replicate())
    elif seq:
        top["tok_embeddings"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                    use_local_output=True)
        top["output"] = PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate(),
                                           use_local_output=True)
    if seq:
        top["norm"] = SequenceParallel()
    # a pipeline stage's rank model may lack the embedding or the head (parallel/pipeline.py)
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items() if getattr(model, k) is not None})

    for block in model.layers.values():
        plan = attention_plan(block.attention, tp_mesh, stream, comm)
        if seq:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        if block.is_moe:
            plan["ffn"] = ExpertTensorParallel(seq, comm)
        else:
            plan["ffn"] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),))
            plan["ffn.w1"] = ColwiseParallel()
            plan["ffn.w3"] = ColwiseParallel()
            plan["ffn.w2"] = RowwiseParallel(output_layouts=stream)
        parallelize_module(block, tp_mesh, plan)


def attention_plan(attn: nn.Module, tp_mesh: DeviceMesh, stream, comm: Comm) -> dict[str, ParallelStyle]:
    """Heads split over tp. Multi-head attention: q/k/v column-wise (biases with them), per-head QK-norm
    weights replicated (their gradients summed over tp), a whole-projection QK-norm split with the
    heads (its squares summed over tp). Latent attention (MLA): the low-rank down projections and
    their norms replicated (plain tensors), the up projections column-wise over heads."""
    tp = TPGroup(tp_mesh.get_group(), comm)
    plan: dict[str, ParallelStyle] = {"attention.wo": RowwiseParallel(output_layouts=stream)}
    if isinstance(attn, LatentAttention):
        for name in ("wq", "wq_b", "wkv_b"):
            if hasattr(attn, name):
                plan[f"attention.{name}"] = ColwiseParallel()
        # The shared rotary key (wkv_a's last columns) is read by every rank's heads: its gradients add up.
        # The compressed part goes through wkv_b, whose column-wise input sums its gradient already.
        attn.wkv_a.register_forward_hook(lambda _m, _a, out: tp.sum_grad_columns(out, attn.kv_rank))
        # A plain input: every column-wise layer all-reduces its input's gradient, and the down
        # projections' share is whole on every rank, so the sum leaving the region is right as it is.
        plan["attention"] = PrepareModuleInput(input_layouts=(stream, None, None),
                                               desired_input_layouts=(Replicate(), None, None),
                                               use_local_output=True)
    else:
        plan.update({f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")})
        for norm in (attn.q_norm, attn.k_norm) if attn.qk_norm != "none" else ():
            if attn.qk_norm == "full":
                _distribute(norm, "weight", tp_mesh, [Shard(0)])
            swap_class(norm, HeadNorm if attn.qk_norm == "head" else WidthShardedNorm).tp = tp
        # One DTensor input per region, shared by its column-wise layers, so that the input's gradient
        # (a partial sum per rank) is reduced once at the region's boundary, not once per layer.
        plan["attention"] = PrepareModuleInput(input_layouts=(stream, None, None),
                                               desired_input_layouts=(Replicate(), None, None))
    return plan
