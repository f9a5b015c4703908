"""Expert parallelism equals the single-process layer: outputs and every gradient (fp32, atol 1e-5)."""

import pytest
import torch
import torch.distributed as dist
from helpers import assert_rank_matches_reference, moe_reference

from expertmesh import config
from expertmesh.dist.comm_stats import Comm
from expertmesh.moe.layer import MoELayer
from expertmesh.parallel.expert import source_to_expert_major
from expertmesh.parallel.fssdp import ExpertPlacement

pytestmark = pytest.mark.distributed
D, T, E = 16, 24, 8


def _layer(overrides):
    cfg = config.load(None, ["moe.num_experts=8", "moe.expert_dim=12", *overrides])
    torch.manual_seed(0)
    layer = MoELayer(D, cfg.moe)
    layer.init_weights(0.2, 0.2)
    return layer


def _ep_vs_single(rank, world, overrides, skew):
    full = _layer(overrides)
    x_all, probe, out_ref, x_ref = moe_reference(full, world, T, skew)

    # Expert parallel: this rank's tokens, this rank's experts.
    ep = _layer(overrides)
    ep.load_state_dict(full.state_dict())
    placement = ExpertPlacement(E, dist.group.WORLD, Comm())
    local = placement.local_slice()
    for name in ("w1", "w3", "w2"):
        setattr(ep.experts, name, torch.nn.Parameter(getattr(full.experts, name).detach()[local].clone()))
    ep.dispatcher = placement
    stats = assert_rank_matches_reference(ep, full, x_all, probe, out_ref, x_ref, rank, T, local)
    return int(stats.tokens_per_expert_E[2:].sum())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("overrides", [[], ["moe.shared_experts=1", "moe.top_k=1"], ["moe.residual=true"],
                                       ["moe.capacity_factor=0.5"]])
def test_ep_matches_single_process(run_distributed, world, overrides):
    run_distributed(_ep_vs_single, world, overrides, False)


def test_ep_with_ranks_that_receive_nothing(run_distributed):
    routed_elsewhere = run_distributed(_ep_vs_single, 4, [], True)
    assert routed_elsewhere == [0, 0, 0, 0]


def test_source_to_expert_major_permutation():
    recv = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [source][local expert]
    # rows as received: s0e0 s0e0 s0e2 | s1e0 s1e1 s1e1 s1e1 -> want e0: s0,s0,s1  e1: s1 x3  e2: s0
    perm = source_to_expert_major(recv, 7)
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert source_to_expert_major(torch.zeros(2, 3, dtype=torch.long), 0).numel() == 0
