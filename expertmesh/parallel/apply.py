"""parallelize_model: everything that turns a meta-device model into this rank's trainable part.

Order: tensor parallelism -> expert placement -> data parallelism -> materialize + init. The model
itself knows nothing of this. Initialization happens on the full model with one seed before any
slicing, so the same seed gives the same full weights whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from expertmesh.config import ConfigError, JobConfig
from expertmesh.dist.comm_stats import Comm
from expertmesh.models.transformer import moe_layers
from expertmesh.parallel.data_parallel import GradAverager, GradGroup
from expertmesh.parallel.expert import ExpertParallel
from expertmesh.parallel.mesh import Mesh


@dataclass
class Parallelized:
    model: nn.Module
    grad_sync: GradAverager
    dense_params: list[nn.Parameter]
    expert_params: list[nn.Parameter]  # sharded over ep (empty when ep = 1)
    sharded_fqns: dict[str, object] = field(default_factory=dict)  # fqn -> 1-D DeviceMesh they are Shard(0) on


def check_supported(mesh: Mesh) -> None:
    if mesh.dims.tp > 1:
        raise ConfigError(f"parallel.tp={mesh.dims.tp}: tensor parallelism is not available yet (use tp=1)")


def _place_experts(model: nn.Module, mesh: Mesh, comm: Comm) -> list[str]:
    """Keeps this rank's slice of every MoE layer's experts and attaches the all-to-all placement."""
    group = mesh.group("ep")
    names = []
    prefix = {m: n for n, m in model.named_modules()}
    for layer in moe_layers(model):
        placement = ExpertParallel(layer.num_experts, group, comm)
        local = placement.local_slice()
        for w in ("w1", "w3", "w2"):
            full = getattr(layer.experts, w)
            setattr(layer.experts, w, nn.Parameter(full.detach()[local].clone()))
            names.append(f"{prefix[layer.experts]}.{w}")
        layer.placement = placement
    return names


def parallelize_model(model: nn.Module, mesh: Mesh, cfg: JobConfig, device: torch.device, comm: Comm):
    check_supported(mesh)
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        model.init_weights()
    d = mesh.dims
    expert_names = _place_experts(model, mesh, comm) if d.ep > 1 else []
    named = dict(model.named_parameters())
    expert_params = [named[n] for n in expert_names]
    dense_params = [p for n, p in named.items() if n not in set(expert_names)]
    groups = [GradGroup(dense_params, mesh.group("dense_dp"), "dense_dp", d.degree("dense_dp"))]
    if expert_params:
        groups.append(GradGroup(expert_params, mesh.group("expert_dp"), "expert_dp", d.degree("dense_dp")))
    sharded = {n: mesh.views["ep"] for n in expert_names}
    return Parallelized(model, GradAverager(groups, comm), dense_params, expert_params, sharded)
