"""parallelize_model: everything that turns a meta-device model into this rank's trainable part.

Order (each step is a function below, applied from outside the model):
  1. tensor parallelism      DTensor plans over `tp` (parallel/tensor.py)
  2. expert placement        experts split along E over `ep` (Shard(0)), the all-to-all attached
  3. activation checkpointing  every block recomputed in backward (`parallel.activation_checkpoint`)
     + compile               each block's forward compiled on its own (`train.compile`, regional)
  4. data parallelism        FSDP2 over `dense_dp` for dense weights and over `expert_dp` for experts
                             (`parallel.dp_shard`), or replicated weights with bucketed all-reduce
  5. materialize + load      each rank reads or draws only its own slices (dist/shards.py)

After step 4 every sharded weight is a DTensor that knows its global shape and its placement, so a
DCP checkpoint is layout-free and loads under any other layout. Step 5 fills each rank's slices from an
HF checkpoint (`model.hf_path`) or from the seed, drawing each tensor (each expert) from its own
generator, so the same seed gives the same full weights whatever the layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from expertmesh.config import JobConfig
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.shards import load_shards
from expertmesh.models.init import SeededInit
from expertmesh.models.transformer import moe_layers
from expertmesh.parallel.data_parallel import GradAverager, GradGroup
from expertmesh.parallel.fssdp import ExpertPlacement
from expertmesh.parallel.mesh import Mesh
from expertmesh.parallel.sharded import ShardedExperts, swap_class
from expertmesh.parallel.tensor import apply_tensor_parallel


def compute_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype | None:
    """bf16 under `train.mixed_precision = "bf16"` ("auto": on CUDA only); None computes in fp32."""
    mp = cfg.train.mixed_precision
    return torch.bfloat16 if mp == "bf16" or (mp == "auto" and device.type == "cuda") else None


@dataclass
class Parallelized:
    model: nn.Module
    grad_sync: GradAverager  # the gradient reductions FSDP does not do (all of them when dp_shard=false)
    fsdp: bool
    bytes_read: int = 0  # checkpoint bytes this rank read (model.hf_path)
    roots: list = field(default_factory=list)  # pipeline stages (parallel/pipeline.py), else empty
    pipeline: object = None  # their schedule (parallel/pipeline.py: Pipeline), set by the trainer
    compiled: CompileCounts | None = None  # train.compile: what the compiled blocks really ran


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in moe_layers(model) for p in layer.experts.parameters()]


def place_experts(model: nn.Module, mesh: Mesh, cfg: JobConfig, comm: Comm) -> None:
    """Keeps this rank's experts of every MoE layer (a global Shard(0) DTensor over `ep`, composed with
    the tp split of F if any) and swaps in the layer's token dispatcher: the all-to-all of expert
    parallelism, or FSSDP (the same owner shards at the start; replicas and owner moves per step,
    parallel/fssdp.py)."""
    group = mesh.group("ep")
    for layer in moe_layers(model):
        if cfg.moe.placement == "fssdp":
            placement = ExpertPlacement(layer.num_experts, group, comm, cfg.moe.fssdp)
        else:
            placement = ExpertPlacement(layer.num_experts, group, comm)
        rows = placement.local_slice()
        swap_class(layer.experts, ShardedExperts)
        for name in ("w1", "w3", "w2"):
            param = getattr(layer.experts, name)
            if isinstance(param, DTensor):  # already split over tp: add ep in front, (ep, tp) mesh
                sub = mesh.device_mesh[("ep", *param.device_mesh.mesh_dim_names)]
                local, placements = param.to_local()[rows], [Shard(0), *param.placements]
            else:
                sub, local, placements = mesh.views["ep"], param.detach()[rows], [Shard(0)]
            setattr(layer.experts, name, nn.Parameter(DTensor.from_local(local, sub, placements, run_check=False)))
        layer.dispatcher = placement
    if cfg.moe.placement == "fssdp":  # the replicas' weights travel while the block's attention runs
        for block in model.layers.values():
            for layer in moe_layers(block):
                block.register_forward_pre_hook(lambda _m, _a, p=layer.dispatcher, x=layer.experts: p.prefetch(x))


def apply_activation_checkpointing(model: nn.Module) -> None:
    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block)


class CompileCounts:
    """What compiled blocks really ran: graphs compiled, calls into them, block forwards (counted by a hook
    outside the compiled code) and how many of those forwards ran at least one compiled graph. A frame
    that Dynamo gives up on (recompile limit, a mode it will not trace under) runs eagerly: no call.
    A block whose code breaks the graph runs several graphs per forward (expert parallelism's exchange)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0
        self.forwards = 0
        self.compiled_forwards = 0
        self._open = False  # a forward began and has not called a graph yet (blocks do not nest)

    def backend(self, name: str):
        """`name`'s Dynamo backend with every graph it compiles counted, and every call into one."""
        compile_graph = torch._dynamo.lookup_backend(name)

        def counted(gm, example_inputs):
            self.graphs += 1
            compiled = compile_graph(gm, example_inputs)

            def call(*args):
                self.calls += 1
                self.compiled_forwards += self._open
                self._open = False
                return compiled(*args)
            return call

        return counted

    def count_forward(self, _module, _args) -> None:
        self.forwards += 1
        self._open = True

    def take(self) -> dict:
        """Since the last call: block forwards, those that ran compiled, calls into graphs; graphs in all."""
        out = {"graphs": self.graphs, "calls": self.calls, "forwards": self.forwards,
               "compiled_forwards": self.compiled_forwards}
        self.calls = self.forwards = self.compiled_forwards = 0
        return out


def apply_compile(model: nn.Module, backend: str = "inductor") -> CompileCounts:
    """Regional compilation, as torchtitan does it: each block's forward through torch.compile (the blocks
    share one code object, so one graph serves every block of a kind). Only the forward method is replaced:
    parameter names, hooks (FSDP's, TP's input plans, FSSDP's prefetch) and checkpoints are those of the
    eager model. Expert parallelism's exchange (host split sizes, counted collectives) runs eagerly
    (parallel/fssdp.py: `ExpertPlacement.forward`): a MoE block then runs as the graphs before and after
    it (4 in torch 2.13, the resumed MoE layer and block each their own)."""
    # dispatch's output size is data-dependent: its fake gives an unbacked size, traced, not a graph break
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    if backend == "inductor" and os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        # ATen's scalar kernels asked for: inductor's vectorized C++ then fails to compile (at::vec undeclared)
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = 1
    counts = CompileCounts()
    compiled_backend = counts.backend(backend)
    for block in model.layers.values():
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        inner.register_forward_pre_hook(counts.count_forward)
        inner.forward = torch.compile(inner.forward, backend=compiled_backend)
    return counts


def apply_fsdp(model: nn.Module, mesh: Mesh, fssdp: bool = False, dtype: torch.dtype | None = None,
               roots: list[nn.Module] | None = None) -> None:
    """FSDP2: dense weights sharded over dense_dp (dp_replicate x dp x ep: ranks of an ep group see
    different tokens, so they are data-parallel for dense weights), experts over expert_dp only.
    Under FSSDP the experts are already sharded (over ep, by owner) and FSDP leaves them alone.
    Mixed precision as torchtitan has it: `dtype` (bf16) parameters gathered for compute, gradients
    reduced in fp32, fp32 master weights and optimizer state; each router is a unit of its own that keeps
    fp32 parameters (routing is computed in fp32: moe/router.py). `roots` (pipeline stages) are the root
    units in place of the model: each holds its stage's embedding or head."""
    d = mesh.dims
    n_dense = d.degree("dense_dp")
    sum_only = dist.get_backend() == "gloo"  # gloo has no AVG / PREMUL_SUM: sum, then FSDP divides
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()

    def shard(module, dp_mesh, mp_policy=policy, **kw):
        fully_shard(module, mesh=dp_mesh, mp_policy=mp_policy, **kw)
        module.set_force_sum_reduction_for_comms(sum_only)
        return module

    ignored = None
    if d.ep > 1 and d.degree("expert_dp") > 1 and not fssdp:
        for layer in moe_layers(model):  # see build_grad_sync for the divisor
            shard(layer.experts, mesh.views["expert_dp"]).set_gradient_divide_factor(float(n_dense))
    elif d.ep > 1:  # ep = dense_dp, or FSSDP: build_grad_sync reduces and scales the experts
        ignored = set(expert_params(model))
    if dtype is not None:
        for layer in moe_layers(model):
            shard(layer.router, mesh.views["dense_dp"], MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                              reduce_dtype=torch.float32))
    for block in model.layers.values():
        shard(block, mesh.views["dense_dp"], ignored_params=ignored)
    for root in roots or [model]:
        shard(root, mesh.views["dense_dp"], ignored_params=ignored)


def build_grad_sync(model: nn.Module, mesh: Mesh, fsdp: bool, comm: Comm, fssdp: bool = False) -> GradAverager:
    """The gradient reductions FSDP does not do (all of them without FSDP). Dense gradients are
    averaged over dense_dp. Expert gradients already hold every ep rank's tokens (the all-to-all
    backward brought them), so they are summed over expert_dp and divided by the dense_dp degree
    too. Built after materialization: the parameter objects must be the final ones."""
    d = mesh.dims
    n_dense, n_expert = d.degree("dense_dp"), d.degree("expert_dp")
    experts = expert_params(model) if d.ep > 1 else []
    if fsdp:
        leftover = experts if n_expert == 1 or fssdp else []
        return GradAverager([GradGroup(leftover, mesh.group("expert_dp"), "expert_dp", n_dense)], comm)
    dense = [p for p in model.parameters() if all(p is not e for e in experts)]
    groups = [GradGroup(dense, mesh.group("dense_dp"), "dense_dp", n_dense)]
    if experts:
        groups.append(GradGroup(experts, mesh.group("expert_dp"), "expert_dp", n_dense))
    return GradAverager(groups, comm)


def load_weights(model: nn.Module, cfg: JobConfig) -> int:
    """Fills this rank's slices of a materialized model: from `model.hf_path`'s safetensors, or drawn from
    `train.seed` (the same full weights in every layout). No rank builds the full model. Returns the
    checkpoint bytes read."""
    model.init_rope()
    if not cfg.model.hf_path:
        load_shards(model, SeededInit(cfg.model, cfg.train.seed).read)
        return 0
    from expertmesh.models.hf import HFSource

    source = HFSource(cfg)
    load_shards(model, source.read)
    return source.files.bytes_read


def shard_model(model: nn.Module, mesh: Mesh, cfg: JobConfig, comm: Comm, dtype: torch.dtype | None = None,
                make_roots=None) -> tuple[bool, list[nn.Module], CompileCounts | None]:
    """Steps 1-4 on a meta-device model; returns whether FSDP manages the dense weights, the modules
    `make_roots(model)` built after steps 1-3 (pipeline stages: FSDP's roots; none without it), and the
    compiled blocks' counts (train.compile)."""
    d, p = mesh.dims, cfg.parallel
    if d.tp > 1:
        apply_tensor_parallel(model, mesh.views["tp"], p, comm)
    if d.ep > 1:
        place_experts(model, mesh, cfg, comm)
    if p.activation_checkpoint == "full":
        apply_activation_checkpointing(model)
    counts = apply_compile(model, cfg.train.compile_backend) if cfg.train.compile else None
    roots = make_roots(model) if make_roots is not None else []
    fsdp = p.dp_shard and d.degree("dense_dp") > 1
    if fsdp:
        apply_fsdp(model, mesh, cfg.moe.placement == "fssdp", dtype, roots or None)
    return fsdp, roots, counts


def parallelize_model(model: nn.Module, mesh: Mesh, cfg: JobConfig, device: torch.device, comm: Comm,
                      make_roots=None):
    """`make_roots(model)`: under pp, the stage modules over the placed blocks (see shard_model)."""
    fsdp, roots, counts = shard_model(model, mesh, cfg, comm, compute_dtype(cfg, device), make_roots)
    model.to_empty(device=device)
    for root in roots if fsdp else []:  # FSDP's roots re-point their sharded parameters at the new storage
        root.to_empty(device=device)
    if not fsdp:  # FSDP keeps tied weights as one parameter; a plain module needs them tied again
        model.tie_weights()
    nbytes = load_weights(model, cfg)
    grad_sync = build_grad_sync(model, mesh, fsdp, comm, cfg.moe.placement == "fssdp")
    return Parallelized(model, grad_sync, fsdp, nbytes, roots, compiled=counts)
