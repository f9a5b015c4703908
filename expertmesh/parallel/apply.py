"""parallelize_model: everything that turns a meta-device model into this rank's trainable part.

Order: tensor parallelism -> expert placement -> data parallelism -> materialize + init. The
model itself knows nothing of this. Today every rank holds the whole model (ep = tp = 1, checked
at start-up) and gradients are averaged across the dense data-parallel group.
"""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.config import ConfigError, JobConfig
from expertmesh.dist.comm_stats import Comm
from expertmesh.parallel.data_parallel import GradAverager
from expertmesh.parallel.mesh import Mesh


def check_supported(mesh: Mesh) -> None:
    d = mesh.dims
    if d.ep > 1 or d.tp > 1:
        raise ConfigError(f"parallel.ep={d.ep}, parallel.tp={d.tp}: this build trains with ep=1 and tp=1 only "
                          "(expert and tensor parallelism are not available yet)")


def parallelize_model(model: nn.Module, mesh: Mesh, cfg: JobConfig, device: torch.device, comm: Comm):
    """Returns (model, grad_sync): the materialized, initialized model and its gradient synchronizer."""
    check_supported(mesh)
    model.to_empty(device=device)
    # Same seed on every rank -> the same full weights whatever the layout.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        model.init_weights()
    return model, GradAverager(model, mesh.group("dense_dp"), comm)
