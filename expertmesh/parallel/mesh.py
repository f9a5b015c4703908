"""ParallelDims: the parallel degrees of a job, and the one named DeviceMesh built from them.

Rank layout is row-major over (pp, dp_replicate, dp, ep, tp): tp is innermost, so the ranks of a
tensor-parallel group are neighbours (one node); pp is outermost, so a pipeline stage's ranks are a
contiguous block (stage s holds ranks s * world/pp ...) and only the stage boundaries cross nodes. The
data-parallel coordinate of a rank is `(rank mod world/pp) // tp`. Axes of size 1 are left out of the
mesh, so they create no process group.

Views a caller asks for by name:
  "dense_dp"   ranks that hold the same dense weights and see different data (dp_replicate x dp x ep)
  "expert_dp"  ranks that hold the same experts (dp_replicate x dp)
  "pp", "ep", "tp", "dp", "dp_replicate"  the single axes
Under DiLoCo (`independent_replicas`) the dp_replicate workers train apart: gradients are averaged
only inside a worker, so dense_dp is dp x ep and expert_dp is dp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from expertmesh.config import ConfigError, ParallelConfig

AXES = ("pp", "dp_replicate", "dp", "ep", "tp")
VIEWS = {"dense_dp": ("dp_replicate", "dp", "ep"), "expert_dp": ("dp_replicate", "dp")}
WORKER_VIEWS = {"dense_dp": ("dp", "ep"), "expert_dp": ("dp",)}  # DiLoCo: within one worker


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp: int
    ep: int
    tp: int
    world_size: int
    independent_replicas: bool = False  # DiLoCo workers: no gradient averaging across dp_replicate
    pp: int = 1  # pipeline stages (outermost)

    @property
    def views(self) -> dict[str, tuple[str, ...]]:
        return WORKER_VIEWS if self.independent_replicas else VIEWS

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int, independent_replicas: bool = False) -> ParallelDims:
        """Resolves dp = -1 to the rest of WORLD_SIZE and checks that the degrees multiply to it."""
        if world_size < 1:
            raise ConfigError(f"WORLD_SIZE={world_size} must be >= 1")
        others = p.pp * p.dp_replicate * p.ep * p.tp
        dp = p.dp
        if dp == -1:
            if world_size % others:
                raise ConfigError(
                    f"pp({p.pp}) * dp_replicate({p.dp_replicate}) * ep({p.ep}) * tp({p.tp}) = {others} "
                    f"does not divide WORLD_SIZE({world_size})"
                )
            dp = world_size // others
        total = p.pp * p.dp_replicate * dp * p.ep * p.tp
        if total != world_size:
            raise ConfigError(
                f"pp({p.pp}) * dp_replicate({p.dp_replicate}) * dp({dp}) * ep({p.ep}) * tp({p.tp}) = {total} "
                f"!= WORLD_SIZE({world_size})"
            )
        return cls(dp_replicate=p.dp_replicate, dp=dp, ep=p.ep, tp=p.tp, world_size=world_size,
                   independent_replicas=independent_replicas, pp=p.pp)

    def degree(self, name: str) -> int:
        axes = self.views.get(name, (name,))
        out = 1
        for axis in axes:
            out *= getattr(self, axis)
        return out

    @property
    def active_axes(self) -> tuple[str, ...]:
        return tuple(a for a in AXES if getattr(self, a) > 1)

    def coordinate(self, rank: int) -> dict[str, int]:
        """This rank's index along every axis (row-major, tp innermost)."""
        coord = {}
        for axis in reversed(AXES):
            size = getattr(self, axis)
            coord[axis] = rank % size
            rank //= size
        return {a: coord[a] for a in AXES}

    def data_rank(self, rank: int) -> int:
        """Index of the data shard a rank reads: tp ranks and a pipeline's stages share data, everyone else
        differs."""
        return rank % self.stage_world // self.tp

    @property
    def stage_world(self) -> int:
        """Ranks of one pipeline stage (the whole world without pp)."""
        return self.world_size // self.pp

    @property
    def data_world(self) -> int:
        return self.stage_world // self.tp

    def build_mesh(self, device_type: str) -> Mesh:
        if self.world_size > 1 and not dist.is_initialized():
            raise RuntimeError("build_mesh needs an initialized process group when WORLD_SIZE > 1")
        axes = self.active_axes
        if not axes:
            return Mesh(self, None, {})
        mesh = init_device_mesh(device_type, tuple(getattr(self, a) for a in axes), mesh_dim_names=axes)
        views = {a: mesh[a] for a in axes}
        for view, members in self.views.items():
            present = tuple(a for a in members if a in axes)
            if len(present) == 1:
                views[view] = mesh[present[0]]
            elif len(present) > 1:
                views[view] = mesh[present]._flatten(view)  # kept here: torch wants flattened meshes held
        return Mesh(self, mesh, views)


@dataclass(frozen=True)
class Mesh:
    """The job's one DeviceMesh (None when every axis is 1) and its 1-D views by name."""

    dims: ParallelDims
    device_mesh: DeviceMesh | None
    views: dict[str, DeviceMesh]

    def group(self, view: str) -> dist.ProcessGroup | None:
        """Process group of a view; None when its degree is 1 (nothing to communicate)."""
        if self.dims.degree(view) == 1:
            return None
        return self.views[view].get_group()
