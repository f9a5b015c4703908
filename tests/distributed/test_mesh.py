import pytest
import torch.distributed as dist

from expertmesh import config
from expertmesh.parallel.mesh import ParallelDims

pytestmark = pytest.mark.distributed


def _mesh_on_rank(rank, world, overrides):
    cfg = config.load(None, overrides)
    dims = ParallelDims.from_config(cfg.parallel, world)
    mesh = dims.build_mesh("cpu")
    groups = {}
    for view in ("dense_dp", "expert_dp", "dp", "ep", "tp"):
        g = mesh.group(view)
        groups[view] = None if g is None else dist.get_process_group_ranks(g)
    names = None if mesh.device_mesh is None else mesh.device_mesh.mesh_dim_names
    return {"names": names, "groups": groups, "coord": dims.coordinate(rank)}


def _row_major_group(rank, dims, axes):
    """Ranks that differ from `rank` only along `axes`, from the layout's definition."""
    coord = dims.coordinate(rank)
    members = []
    for r in range(dims.world_size):
        c = dims.coordinate(r)
        if all(c[a] == coord[a] for a in coord if a not in axes):
            members.append(r)
    return members


@pytest.mark.parametrize("world, overrides, names", [
    (1, [], None),
    (2, [], ("dp",)),
    (2, ["parallel.ep=2"], ("ep",)),
    (4, ["parallel.ep=2"], ("dp", "ep")),
    (4, ["parallel.tp=2", "parallel.ep=2"], ("ep", "tp")),
    (8, ["parallel.ep=2", "parallel.tp=2"], ("dp", "ep", "tp")),
    (8, ["parallel.dp_replicate=2", "parallel.ep=4"], ("dp_replicate", "ep")),
])
def test_mesh_groups_match_the_row_major_layout(run_distributed, world, overrides, names):
    if world == 1:
        dims = ParallelDims.from_config(config.load(None, overrides).parallel, 1)
        mesh = dims.build_mesh("cpu")
        assert mesh.device_mesh is None and all(mesh.group(v) is None for v in ("dense_dp", "ep", "tp"))
        return
    results = run_distributed(_mesh_on_rank, world, overrides)
    dims = ParallelDims.from_config(config.load(None, overrides).parallel, world)
    views = {"dense_dp": ("dp_replicate", "dp", "ep"), "expert_dp": ("dp_replicate", "dp"),
             "dp": ("dp",), "ep": ("ep",), "tp": ("tp",)}
    for rank, res in enumerate(results):
        assert res["names"] == names
        for view, axes in views.items():
            expected = _row_major_group(rank, dims, axes)
            got = res["groups"][view]
            if len(expected) == 1:
                assert got is None, (rank, view)  # axes of size 1 create no group
            else:
                assert sorted(got) == expected, (rank, view, got, expected)
