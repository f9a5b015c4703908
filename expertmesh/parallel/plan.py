"""`expertmesh plan`: what a layout costs each rank, predicted from shapes before anything launches.

The model is sharded exactly as a run would shard it (the same `shard_model`, on the meta device,
under a fake process group of the run's world size, so no memory and no processes), and rank 0's
pieces are read off it: bytes of parameters, gradients and optimizer state, and the all-gather
inputs of every FSDP unit. Communication per training step and mesh view follows from those and
from the activation shapes, with the per-rank costs `Comm` counts (all-reduce 2(n-1)/n·B,
all-gather and reduce-scatter (n-1)/n·B of the full tensor, all-to-all: the rows that leave):

  dense_dp / expert_dp  FSDP, per micro-batch and unit: all-gather in forward, again in backward
                        (not for the root unit, which stays gathered), reduce-scatter of the grads;
                        replicated (dp_shard=false): one all-reduce of the grads per step
  ep                    per MoE layer and micro-batch: the counts, then rows out and back in forward
                        and again in backward; T*K*(P-1)/P rows leave under uniform routing (the
                        measured figure follows the real routing)
  tp                    per block and micro-batch, 4(n-1)/n of the block input's bytes for each of
                        attention and FFN (all-gather + reduce-scatter each way with sequence
                        parallelism, one all-reduce each way without), plus the embedding and
                        head, the MoE combine weights' gradient, and with activation checkpointing
                        the forward collectives that recomputation repeats

Activation memory is an estimate (saved tensors of attention, FFN and logits), the rest is exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from expertmesh.config import JobConfig
from expertmesh.dist.comm_stats import Comm
from expertmesh.models.transformer import Transformer, moe_layers
from expertmesh.parallel.apply import expert_params, shard_model
from expertmesh.parallel.mesh import ParallelDims

VIEWS = ("dense_dp", "expert_dp", "ep", "tp")


@dataclass
class Plan:
    dims: ParallelDims
    comm: dict[str, float] = field(default_factory=dict)  # view -> predicted bytes sent per step (rank 0)
    memory: dict[str, float] = field(default_factory=dict)  # what -> bytes on rank 0


@contextlib.contextmanager
def _fake_world(world: int):
    """A process group of `world` ranks in this one process whose collectives do nothing."""
    if dist.is_initialized():
        raise RuntimeError("plan needs a process without a process group")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_numel(p: torch.Tensor) -> int:
    return p._local_tensor.numel() if isinstance(p, DTensor) else p.numel()


def _fsdp_units(model) -> list[tuple[str, bool, int]]:
    """(view, is_root, padded all-gather input bytes on this rank) of every FSDP unit."""
    from torch.distributed.fsdp import FSDPModule

    units = []
    experts = {id(layer.experts) for layer in moe_layers(model)}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group  # no public accessor for the padded sizes
        if group is None:
            continue
        nbytes = sum(fp.padded_sharded_param_size.numel() * fp.sharded_param.element_size()
                     for fp in group.fsdp_params)
        units.append(("expert_dp" if id(module) in experts else "dense_dp", module is model, nbytes))
    return units


def plan(cfg: JobConfig, world: int) -> Plan:
    dims = ParallelDims.from_config(cfg.parallel, world)
    out = Plan(dims)
    with _fake_world(world):
        mesh = dims.build_mesh("cpu")
        with torch.device("meta"):
            model = Transformer(cfg)
        fsdp, _ = shard_model(model, mesh, cfg, Comm())
        param_bytes = sum(_local_numel(p) * p.element_size() for p in model.parameters())
        units = _fsdp_units(model) if fsdp else []
        experts = {id(p) for p in expert_params(model)} if dims.ep > 1 else set()
        expert_local = sum(_local_numel(p) * 4 for p in model.parameters() if id(p) in experts)
        dense_local = sum(_local_numel(p) * 4 for p in model.parameters() if id(p) not in experts)
    m, e, d, p = cfg.model, cfg.moe, cfg.data, cfg.parallel
    b = 2 if cfg.train.mixed_precision == "bf16" else 4  # activation bytes ("auto" is fp32 on CPU)
    accum = cfg.train.grad_accum
    T = d.batch_size * d.seq_len  # tokens per micro-batch of one data rank (every tp rank holds them)
    act = T * m.dim * b
    n_moe = len(e.experts_in_layers(m.n_layers))
    ac = p.activation_checkpoint == "full"
    comm = dict.fromkeys(VIEWS, 0.0)

    # data parallelism
    fssdp = e.placement == "fssdp" and dims.ep > 1
    if fsdp:
        for view, root, nbytes in units:
            n = dims.degree(view)
            comm[view] += accum * (n - 1) * nbytes * (2 if root else 3)
        if fssdp:  # FSDP leaves the owner shards alone; their gradients are all-reduced over expert_dp
            n = dims.degree("expert_dp")
            comm["expert_dp"] += 2 * (n - 1) / n * expert_local
    else:
        for view, nbytes in (("dense_dp", dense_local), ("expert_dp", expert_local)):
            n = dims.degree(view)
            comm[view] += 2 * (n - 1) / n * nbytes
    # expert parallelism
    if dims.ep > 1:
        P = dims.ep
        for E in e.experts_in_layers(m.n_layers):
            counts = (P - 1) * (E // P) * 8
            rows = T * e.top_k * (P - 1) / P * m.dim * b
            comm["ep"] += accum * ((counts + 2 * rows) * (2 if ac else 1) + 2 * rows)
    # tensor parallelism
    if dims.tp > 1:
        c = (dims.tp - 1) / dims.tp
        # recomputation stops at the last op whose result backward needs: the FFN's output reduction
        # is not redone, so 3 of the 4 forward transfers with sequence parallelism, 1 of 2 without
        per_block = 8 * c * act + (((3 if p.sequence_parallel else 2) * c * act) if ac else 0)
        ends = (4 * c * act + c * T * m.vocab_size * b) if p.vocab_parallel else (2 * c * act if p.sequence_parallel
                                                                                    else 0)
        small = n_moe * 2 * c * T * e.top_k * 4  # combine weights' gradient (fp32), backward only
        if e.residual:
            small += n_moe * 2 * c * T * 2 * 4
        if p.sequence_parallel:  # partial norm-weight gradients, summed once per step
            small += (2 * m.n_layers + 1) * 2 * c * m.dim * 4 / accum
        comm["tp"] = accum * (m.n_layers * per_block + ends + small)
    out.comm = {k: v for k, v in comm.items() if dims.degree(k) > 1 and not (k == "expert_dp" and dims.ep == 1)}

    # memory of rank 0
    opt = 2 * param_bytes  # AdamW: exp_avg and exp_avg_sq per parameter
    gathered = max((nb * dims.degree(view) for view, _, nb in units), default=0) * 2  # current + prefetched
    seq_local = T // dims.tp if p.sequence_parallel else T
    F = e.expert_dim // dims.tp
    per_layer = T * (6 * m.dim // dims.tp + 2 * m.n_heads // dims.tp * d.seq_len) * b + 4 * seq_local * m.dim * b
    per_layer += T * (e.top_k * (2 * m.dim + 3 * F) + 3 * m.ffn_dim // dims.tp) * b
    acts = m.n_layers * (seq_local * m.dim * b if ac else per_layer) + (per_layer if ac else 0)
    acts += T * m.vocab_size * 4 * 2  # logits and their fp32 softmax
    out.memory = {"params": param_bytes, "grads": param_bytes, "optimizer": opt, "fsdp_gathered": gathered,
                  "activations (estimate)": acts}
    if fssdp:  # at most extra_slots replicas per layer, with their gradients; one layer's when re-materialized
        per_expert = 3 * m.dim * F * 4
        extra = e.fssdp.extra_slots if e.fssdp.extra_slots >= 0 else max(e.experts_in_layers(m.n_layers)) // dims.ep
        layers = 1 if e.fssdp.rematerialize else n_moe
        out.memory["fssdp_replicas (at most)"] = 2 * layers * extra * per_expert
    out.memory["total"] = sum(out.memory.values())
    return out


def _fmt(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def render(pl: Plan, measured: dict[str, float] | None = None) -> str:
    d = pl.dims
    lines = [f"layout: dp_replicate={d.dp_replicate} dp={d.dp} ep={d.ep} tp={d.tp} (world {d.world_size})",
             "", "communication per step, bytes sent by rank 0:"]
    head = f"  {'view':10s} {'degree':>6s} {'predicted':>12s}"
    lines.append(head + (f" {'measured':>12s} {'ratio':>6s}" if measured is not None else ""))
    for view, nbytes in pl.comm.items():
        row = f"  {view:10s} {d.degree(view):6d} {_fmt(nbytes):>12s}"
        if measured is not None:
            got = measured.get(view, 0.0)
            row += f" {_fmt(got):>12s} {got / nbytes if nbytes else float('nan'):6.2f}"
        lines.append(row)
    if not pl.comm:
        lines.append("  (none: one rank holds everything)")
    lines += ["", "memory per rank:"]
    lines += [f"  {k:24s} {_fmt(v):>12s}" for k, v in pl.memory.items()]
    return "\n".join(lines)
