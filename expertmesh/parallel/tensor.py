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
combine weights' gradient is partial too and is all-reduced (T x K floats), so everything on the
replicated router path gets the same gradient on every tp rank; the layer input's gradient is
summed as a dense layer's is (see TensorParallelSync). The layer's tp traffic equals a dense MLP's.

Legend: B batch, S sequence, D model dim, T tokens.
"""

from __future__ import annotations

import torch
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


class TensorParallelSync:
    """What MoELayer calls under expert tensor parallelism (`self.tp_sync`):

    `__call__(t)`     on tensors whose gradient each rank sees only in part (combine weights, PR-MoE
                      coefficients): all-reduces that gradient, so the router's is whole everywhere.
    `expert_input(x)` / `router_input(x)`: the layer input as the F-split experts and as the replicated
                      router see it. The input's gradient must leave the layer summed over tp: the
                      experts' part is partial, the router's whole on every rank. Without sequence
                      parallelism the experts' part is all-reduced here (`f`). With it, the layer's
                      input hook reduce-scatters the whole gradient as a partial sum instead (half the
                      bytes), so the router's part is scaled by 1/tp to be counted once."""

    def __init__(self, group, comm: Comm, sequence_parallel: bool) -> None:
        self.group, self.comm, self.seq = group, comm, sequence_parallel
        self.size = torch.distributed.get_world_size(group)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return _SumGradOverTP.apply(t, self.group, self.comm)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` summed (e.g. the squares of a norm over heads held by different ranks)."""
        return _AllReduceSum.apply(t, self.group, self.comm)

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.seq else _SumGradOverTP.apply(x, self.group, self.comm)

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(x, 1.0 / self.size) if self.seq else x


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
        experts = module.experts
        _distribute(experts, "w1", device_mesh, [Shard(2)])
        _distribute(experts, "w3", device_mesh, [Shard(2)])
        _distribute(experts, "w2", device_mesh, [Shard(1)])
        for mlp in (module.shared, module.residual_mlp):
            if mlp is not None:
                _distribute(mlp.w1, "weight", device_mesh, [Shard(0)])
                _distribute(mlp.w3, "weight", device_mesh, [Shard(0)])
                _distribute(mlp.w2, "weight", device_mesh, [Shard(1)])
        _distribute(module.router.gate, "weight", device_mesh, [Replicate()])
        for gate in (module.coefficient, module.shared_gate):
            if gate is not None:
                _distribute(gate, "weight", device_mesh, [Replicate()])
        seq = self.sequence_parallel
        module.tp_sync = TensorParallelSync(device_mesh.get_group(), self.comm, seq)

        def gather_input(_mod, args):
            x = args[0]
            if isinstance(x, DTensor):  # sequence-parallel input: gather the sequence; its gradient is a
                # partial sum per rank (see TensorParallelSync), reduce-scattered back to the sequence shards
                x = x.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
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
    their norms replicated, the up projections column-wise over heads."""
    sync = TensorParallelSync(tp_mesh.get_group(), comm, False)
    plan: dict[str, ParallelStyle] = {"attention.wo": RowwiseParallel(output_layouts=stream)}
    if isinstance(attn, LatentAttention):
        for name in ("wq", "wq_b", "wkv_b"):
            if hasattr(attn, name):
                plan[f"attention.{name}"] = ColwiseParallel()
        for name in ("wq_a", "wkv_a", "q_norm", "kv_norm"):
            for pname, _ in getattr(attn, name, nn.Module()).named_parameters():
                _distribute(getattr(attn, name), pname, tp_mesh, [Replicate()])
        # A plain input: every column-wise layer all-reduces its input's gradient, and the down
        # projections' share is whole on every rank, so the sum leaving the region is right as it is.
        plan["attention"] = PrepareModuleInput(input_layouts=(stream, None, None),
                                               desired_input_layouts=(Replicate(), None, None),
                                               use_local_output=True)
    else:
        plan.update({f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")})
        if attn.qk_norm != "none":
            placement = Replicate() if attn.qk_norm == "head" else Shard(0)
            for norm in (attn.q_norm, attn.k_norm):
                _distribute(norm, "weight", tp_mesh, [placement])
        # One DTensor input per region, shared by its column-wise layers, so that the input's gradient
        # (a partial sum per rank) is reduced once at the region's boundary, not once per layer.
        plan["attention"] = PrepareModuleInput(input_layouts=(stream, None, None),
                                               desired_input_layouts=(Replicate(), None, None))
    attn.tp_sync = sync
    return plan
