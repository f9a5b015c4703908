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

VIEWS = ("dense_dp", "expert_dp", "ep", "tp", "pp")


@dataclass
class Plan:
    dims: ParallelDims
    comm: dict[str, float] = field(default_factory=dict)  # view -> predicted bytes sent per step (rank 0)
    memory: dict[str, float] = field(default_factory=dict)  # what -> bytes on rank 0
    pipeline: dict | None = None  # pp > 1: stages, bubbles, per-rank activations and p2p bytes


def bubble_fractions(pp: int, microbatches: int, stages_per_rank: int) -> dict[str, float]:
    """Idle share of a step per schedule, with equal chunk times: 1F1B (p-1)/(M+p-1); Interleaved1F1B
    (p-1)/(vM+p-1); the V schedules split backward into input and weight parts, and with F = B_input = W
    they leave no bubble (ZB-V; DualPipeV's (p/2-1)(F&B + B - 3W) is 0 too)."""
    p, M, v = pp, microbatches, max(stages_per_rank, 2)
    return {"1F1B": (p - 1) / (M + p - 1), "Interleaved1F1B": (p - 1) / (v * M + p - 1),
            "ZBVZeroBubble": 0.0, "DualPipeV": 0.0}


def pipeline_plan(cfg: JobConfig, dims: ParallelDims, act_per_layer: float, boundary_bytes: float) -> dict:
    """Per rank of a pipeline: its stages and layers, the micro-batches it holds in flight at the peak (1F1B:
    p - r; Interleaved1F1B: (v-1)p + 2(p-1-r) + 1 chunks, torch's warm-up; V schedules: at most 2p chunks, an
    upper bound), their activation memory, and the p2p bytes it sends per step (a hidden state per
    micro-batch forward to the next stage and its gradient back, when that stage is on another rank)."""
    from expertmesh.config import PP_SCHEDULES, pp_microbatches
    from expertmesh.parallel.pipeline import layer_costs, rank_stages, stage_layout

    p = cfg.parallel
    pp, v, M, g = p.pp, p.pp_stages_per_rank, pp_microbatches(p), cfg.train.grad_accum
    layout, costs = stage_layout(cfg), layer_costs(cfg)
    n_stages = len(layout)
    owner = {s: r for r in range(pp) for s in rank_stages(cfg, r)}
    style = PP_SCHEDULES[p.pp_schedule][1]
    ranks = []
    for r in range(pp):
        stages = sorted(rank_stages(cfg, r))
        layers = [i for s in stages for i in layout[s]]
        if p.pp_schedule == "1F1B":
            chunks = min(M, pp - r)
        elif style == "loop":
            chunks = min(v * M, (v - 1) * pp + 2 * (pp - 1 - r) + 1)
        else:
            chunks = min(v * M, 2 * pp)
        per_chunk = act_per_layer * len(layers) / len(stages)
        sends = sum(1 for s in stages if s + 1 < n_stages and owner[s + 1] != r)  # forward
        sends += sum(1 for s in stages if s > 0 and owner[s - 1] != r)  # gradients back
        params = sum(costs["params"][i] for i in layers) + (costs["embedding"][0] if 0 in stages else 0) + (
            costs["head"][0] if n_stages - 1 in stages else 0)
        ranks.append({"rank": r, "stages": stages, "layers": layers, "params": params, "chunks_in_flight": chunks,
                      "activations": chunks * per_chunk, "p2p_bytes": g * M * sends * boundary_bytes})
    return {"schedule": p.pp_schedule, "microbatches": M, "stages_per_rank": v, "layout": layout,
            "bubble": bubble_fractions(pp, M, v), "ranks": ranks}


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
        if dims.pp > 1:  # rank 0's stages: the first (and the last under the V schedules)
            from expertmesh.parallel.pipeline import build_rank_model, rank_stages, stage_layout

            model = build_rank_model(cfg, rank_stages(cfg, 0), stage_layout(cfg))
        else:
            with torch.device("meta"):
                model = Transformer(cfg)
        fsdp, _, _ = shard_model(model, mesh, cfg, Comm())
        param_bytes = sum(_local_numel(p) * p.element_size() for p in model.parameters())
        units = _fsdp_units(model) if fsdp else []
        experts = {id(p) for p in expert_params(model)} if dims.ep > 1 else set()
        expert_local = sum(_local_numel(p) * 4 for p in model.parameters() if id(p) in experts)
        dense_local = sum(_local_numel(p) * 4 for p in model.parameters() if id(p) not in experts)
    m, e, d, p = cfg.model, cfg.moe, cfg.data, cfg.parallel
    b = 2 if cfg.train.mixed_precision == "bf16" else 4  # activation bytes ("auto" is fp32 on CPU)
    accum = cfg.train.grad_accum
    here = [i for i in range(m.n_layers) if dims.pp == 1 or str(i) in model.layers]  # rank 0's layers
    moe_ids = [i for i in range(m.n_layers) if e.is_moe(i)]
    experts_here = [E for i, E in zip(moe_ids, e.experts_in_layers(m.n_layers), strict=True) if i in here]
    if dims.pp > 1:
        from expertmesh.config import pp_microbatches

        accum *= pp_microbatches(p)  # micro-batches per step through rank 0's stages
    T = d.batch_size * d.seq_len  # tokens per micro-batch of one data rank (every tp rank holds them)
    act = T * m.dim * b
    n_moe = len(experts_here)
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
        for E in experts_here:
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
            small += (2 * len(here) + 1) * 2 * c * m.dim * 4 / accum
        comm["tp"] = accum * (len(here) * per_block + ends + small)
    comm["pp"] = 0.0  # set below, with the activations
    out.comm = {k: v for k, v in comm.items() if dims.degree(k) > 1 and not (k == "expert_dp" and dims.ep == 1)}

    # memory of rank 0
    opt = 2 * param_bytes  # AdamW: exp_avg and exp_avg_sq per parameter
    gathered = max((nb * dims.degree(view) for view, _, nb in units), default=0) * 2  # current + prefetched
    seq_local = T // dims.tp if p.sequence_parallel else T
    F = e.expert_dim // dims.tp
    per_layer = T * (6 * m.dim // dims.tp + 2 * m.n_heads // dims.tp * d.seq_len) * b + 4 * seq_local * m.dim * b
    per_layer += T * (e.top_k * (2 * m.dim + 3 * F) + 3 * m.ffn_dim // dims.tp) * b
    acts = len(here) * (seq_local * m.dim * b if ac else per_layer) + (per_layer if ac else 0)
    acts += T * m.vocab_size * 4 * 2  # logits and their fp32 softmax
    if dims.pp > 1:
        boundary = d.batch_size * (d.seq_len // dims.tp if p.sequence_parallel else d.seq_len) * m.dim * b
        out.pipeline = pipeline_plan(cfg, dims, seq_local * m.dim * b if ac else per_layer, boundary)
        rank0 = out.pipeline["ranks"][0]
        acts = rank0["activations"] + (T * m.vocab_size * 4 * 2 if len(out.pipeline["layout"]) - 1 in rank0["stages"]
                                       else 0)
        out.comm["pp"] = rank0["p2p_bytes"]
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


def fits(pl: Plan, gpu_gib: float, reserve_gib: float = 4.0) -> str:
    """One line: whether rank 0's memory fits a GPU of `gpu_gib` GiB, leaving `reserve_gib` for the CUDA
    context, NCCL buffers and the allocator's fragmentation; if not, what usually brings it down."""
    need, have = pl.memory["total"] / 2**30, gpu_gib - reserve_gib
    if need <= have:
        return f"fits a {gpu_gib:g} GiB GPU: {need:.1f} GiB of {have:.1f} GiB usable ({reserve_gib:g} GiB kept back)"
    hints = []
    if pl.memory.get("activations (estimate)", 0) > 0.25 * pl.memory["total"]:
        hints.append('parallel.activation_checkpoint="full"')
    hints += ["a larger parallel.ep or parallel.dp (more ranks share the weights and optimizer state)",
              "a shorter data.seq_len or smaller data.batch_size (activations)"]
    return (f"does NOT fit a {gpu_gib:g} GiB GPU: {need:.1f} GiB > {have:.1f} GiB usable ({reserve_gib:g} GiB kept "
            f"back); try {'; '.join(hints)}")


def render(pl: Plan, measured: dict[str, float] | None = None, gpu_gib: float | None = None) -> str:
    d = pl.dims
    lines = [f"layout: pp={d.pp} dp_replicate={d.dp_replicate} dp={d.dp} ep={d.ep} tp={d.tp} (world {d.world_size})",
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
    lines += ["", "memory per rank (rank 0):"]
    lines += [f"  {k:24s} {_fmt(v):>12s}" for k, v in pl.memory.items()]
    if gpu_gib is not None:
        lines.append("  " + fits(pl, gpu_gib))
    if pl.pipeline is not None:
        pp = pl.pipeline
        lines += ["", f"pipeline: {pp['schedule']}, {pp['microbatches']} micro-batches, {pp['stages_per_rank']} "
                      f"stage(s) per rank, layers per stage {[len(s) for s in pp['layout']]}",
                  "  bubble (idle share of a step, equal chunk times): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in pp["bubble"].items()),
                  f"  {'rank':>4s} {'stages':>8s} {'layers':>7s} {'params':>10s} {'in flight':>9s} "
                  f"{'activations':>12s} {'p2p sent':>10s}"]
        for r in pp["ranks"]:
            lines.append(f"  {r['rank']:4d} {str(r['stages']):>8s} {len(r['layers']):7d} {r['params'] / 1e6:9.2f}M "
                         f"{r['chunks_in_flight']:9d} {_fmt(r['activations']):>12s} {_fmt(r['p2p_bytes']):>10s}")
    return "\n".join(lines)
