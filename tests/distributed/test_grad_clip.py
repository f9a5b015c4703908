"""The global gradient-norm clip when a parameter has no gradient on some ranks (a layer their tokens skipped):
every rank still joins every reduction (it hung before), and the norm is the one of the gradients present."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from expertmesh.dist.comm_stats import Comm
from expertmesh.parallel.data_parallel import clip_grad_norm

pytestmark = pytest.mark.distributed


def _clip(rank, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    sharded = torch.nn.Parameter(DTensor.from_local(torch.zeros(2, 3), mesh, [Shard(0)], run_check=False))
    plain = torch.nn.Parameter(torch.zeros(4))
    plain.grad = torch.full((4,), 1.0)
    if rank == 0:  # only rank 0's tokens reached the sharded weight
        sharded.grad = DTensor.from_local(torch.full((2, 3), 2.0), mesh, [Shard(0)], run_check=False)
    norm = clip_grad_norm([sharded, plain], Comm(), max_norm=1.0)
    return float(norm), plain.grad.tolist()


def test_a_missing_gradient_on_one_rank_neither_hangs_nor_skews_the_norm(run_distributed):
    results = run_distributed(_clip, 2, timeout=60)
    expected = (6 * 2.0**2 + 4 * 1.0**2) ** 0.5  # rank 0's shard, and the replicated gradient once
    for norm, plain in results:
        assert norm == pytest.approx(expected)
        assert plain == pytest.approx([1.0 / expected] * 4, rel=1e-5)  # clipped to norm 1 everywhere
