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
once at the layer's output. Two gradients need one all-reduce each in backward, because the
partial outputs make them partial: the layer input as seen by the experts (`tp_sync` on x), and
the combine weights / PR-MoE coefficients (`tp_sync` on them). Everything on the replicated router
path then has identical gradients on every tp rank.

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


class TensorParallelSync:
    """Called by MoELayer as `tp_sync(t)` on a tensor whose gradient each tp rank sees only in part."""

    def __init__(self, group, comm: Comm) -> None:
        self.group, self.comm = group, comm

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return _SumGradOverTP.apply(t, self.group, self.comm)


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
        if module.coefficient is not None:
            _distribute(module.coefficient, "weight", device_mesh, [Replicate()])
        module.tp_sync = TensorParallelSync(device_mesh.get_group(), self.comm)
        seq = self.sequence_parallel

        def gather_input(_mod, args):
            x = args[0]
            if isinstance(x, DTensor):  # sequence-parallel input: gather the sequence; its gradient is
                # replicated (tp_sync made it so), so backward only keeps this rank's slice
                x = x.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Replicate()])
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
    parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        plan: dict[str, ParallelStyle] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
        }
        if seq:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
            plan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                   desired_input_layouts=(Replicate(), None, None))
        if block.is_moe:
            plan["ffn"] = ExpertTensorParallel(seq, comm)
        else:
            if seq:
                plan["ffn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan["ffn.w1"] = ColwiseParallel()
            plan["ffn.w3"] = ColwiseParallel()
            plan["ffn.w2"] = RowwiseParallel(output_layouts=stream)
        parallelize_module(block, tp_mesh, plan)
