"""FSSDP computes exactly what one process with every expert computes: outputs, input and weight
gradients, and AdamW updates (fp32, 1e-5), whatever the plan: no replicas (expert parallelism),
every expert everywhere (data parallelism), a random partial plan, moved owners, skewed routing,
re-materialization, calibration. Plans agree on every rank."""

import random

import pytest
import torch
import torch.distributed as dist
from helpers import assert_rank_matches_reference, moe_reference
from torch.utils.checkpoint import checkpoint

from expertmesh import config
from expertmesh.dist.comm_stats import Comm
from expertmesh.moe.layer import MoELayer
from expertmesh.parallel.fssdp import ExpertPlacement, Plan, move_slots, plan_replicas

pytestmark = pytest.mark.distributed
D, T, E = 16, 24, 8


def _layer(overrides):
    cfg = config.load(None, ["moe.num_experts=8", "moe.expert_dim=12", "parallel.ep=2", 'moe.placement="fssdp"',
                             *overrides])
    torch.manual_seed(0)
    layer = MoELayer(D, cfg.moe)
    layer.init_weights(0.2, 0.2)
    return layer, cfg


def _random_plan(world, seed, slots=None):
    rng = random.Random(seed)
    base = Plan.expert_parallel(E, world, slots)
    holders = []
    for h in base.holders:
        extra = sorted(rng.sample([r for r in range(world) if r != h[0]], rng.randint(0, world - 1)))
        holders.append((h[0], *extra))
    return Plan(base.slots, tuple(holders), world)


def _fssdp_vs_single(rank, world, plan_name, overrides, skew):
    full, cfg = _layer(overrides)
    x_all, probe, out_ref, x_ref = moe_reference(full, world, T, skew)

    comm = Comm()
    layer, _ = _layer(overrides)
    layer.load_state_dict(full.state_dict())
    placement = ExpertPlacement(E, dist.group.WORLD, comm, cfg.moe.fssdp)
    slots = tuple(range(E))
    if plan_name.startswith("moved"):  # owners permuted before the step (the initial rows are moved too)
        slots = tuple(random.Random(7).sample(range(E), E))
    L = E // world
    mine = [slots[rank * L + i] for i in range(L)]
    for name in ("w1", "w3", "w2"):
        setattr(layer.experts, name, torch.nn.Parameter(getattr(full.experts, name).detach()[mine].clone()))
    torch.optim.AdamW(full.experts.parameters(), lr=0.1).step()  # the reference update, after the copy
    plans = {"ep": Plan.expert_parallel(E, world, slots), "dp": Plan.everywhere(E, world, slots),
             "random": _random_plan(world, 3, slots), "moved": _random_plan(world, 5, slots),
             "moved-ep": Plan.expert_parallel(E, world, slots)}
    placement.plan = plans[plan_name]
    layer.dispatcher = placement
    assert_rank_matches_reference(layer, full, x_all, probe, out_ref, x_ref, rank, T, mine)
    opt = torch.optim.AdamW(layer.experts.parameters(), lr=0.1)
    opt.step()
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(getattr(layer.experts, name).detach(), getattr(full.experts, name).detach()[mine],
                                   atol=1e-5, rtol=1e-5)
    return placement.rows, comm.sent.get("fssdp", 0)


@pytest.mark.parametrize("plan_name", ["ep", "dp", "random", "moved"])
def test_fssdp_matches_single_process(run_distributed, plan_name):
    rows_and_bytes = run_distributed(_fssdp_vs_single, 4, plan_name, [], False)
    sent = [b for _, b in rows_and_bytes]
    assert (sum(sent) == 0) == (plan_name in ("ep",)), sent  # replicas cost bytes; none cost none


@pytest.mark.parametrize("overrides", [["moe.fssdp.rematerialize=true"], ["moe.fssdp.calibrate=true"],
                                       ["moe.shared_experts=1", "moe.top_k=1"]])
def test_fssdp_options_match_single_process(run_distributed, overrides):
    run_distributed(_fssdp_vs_single, 4, "random", overrides, False)


def test_fssdp_skewed_routing_spreads_rows(run_distributed):
    """All tokens on experts 0 and 1 (both owned by rank 0): under EP rank 0 computes every row;
    with the calibrated plan the rows spread, and the results still equal one process's."""
    ep_rows = run_distributed(_fssdp_vs_single, 4, "ep", [], True)
    cal_rows = run_distributed(_fssdp_vs_single, 4, "ep", ["moe.fssdp.calibrate=true"], True)
    ep_load = [sum(r) for r, _ in ep_rows]
    cal_load = [sum(r) for r, _ in cal_rows]
    assert ep_load[1:] == [0, 0, 0] and ep_load[0] == 4 * T * 2
    assert sum(cal_load) == sum(ep_load)
    assert max(cal_load) <= 1.2 * sum(cal_load) / 4, cal_load


def _plans_agree(rank, world, seed):
    rng = random.Random(seed + rank)  # different on every rank ...
    shared = random.Random(seed)
    digests = []
    for trial in range(20):
        E_ = shared.choice([4, 8, 16])
        local = torch.tensor([rng.randint(0, 50) if rng.random() < 0.7 else 0 for _ in range(E_)])
        if trial % 5 == 0:
            local = torch.zeros(E_, dtype=torch.int64)  # ranks with no tokens
            if rank == trial % world:
                local[trial % E_] = 1000  # all on one expert
        dist.all_reduce(local)  # ... but the same after the all-reduce
        slots = tuple(range(E_))
        plan = plan_replicas(local.tolist(), slots, world, extra_slots=E_ // world)
        digests.append(plan.digest())
    out = [None] * world
    dist.all_gather_object(out, digests)
    assert all(d == out[0] for d in out)
    return digests


def test_plans_identical_on_every_rank(run_distributed):
    run_distributed(_plans_agree, 4, 11)


def _move_owners(rank, world):
    comm = Comm()
    L = E // world
    full = torch.arange(E * 3, dtype=torch.float32).view(E, 3)
    old = tuple(random.Random(1).sample(range(E), E))
    new = tuple(random.Random(2).sample(range(E), E))
    t = full[list(old[rank * L:(rank + 1) * L])].clone()
    move_slots([t], old, new, world, rank, dist.group.WORLD, comm)
    torch.testing.assert_close(t, full[list(new[rank * L:(rank + 1) * L])], rtol=0, atol=0)


def test_owner_moves_carry_rows(run_distributed):
    run_distributed(_move_owners, 4)


def _rows_under_recompute(rank, world):
    layer, cfg = _layer([])
    placement = ExpertPlacement(E, dist.group.WORLD, Comm(), cfg.moe.fssdp)
    placement.plan = Plan.everywhere(E, world, tuple(range(E)))  # replicas: the gather runs too
    own = placement.local_slice()
    for name in ("w1", "w3", "w2"):
        setattr(layer.experts, name, torch.nn.Parameter(getattr(layer.experts, name).detach()[own].clone()))
    layer.dispatcher = placement
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    out = checkpoint(lambda v: layer(v)[0], x, use_reentrant=False)
    out.square().sum().backward()
    return placement.rows, x.grad is not None


def test_recomputation_counts_a_layers_rows_once(run_distributed):
    """Under activation checkpointing the layer's forward runs again in backward: its rows are counted once."""
    for rows, has_grad in run_distributed(_rows_under_recompute, 2):
        assert len(rows) == 1 and has_grad, rows
