"""The FSSDP planner, router and ownership balancer as pure functions: budgets, balance, conservation."""

import random

import pytest
import torch

from expertmesh import config
from expertmesh.config import ConfigError
from expertmesh.parallel.fssdp import Plan, balanced_slots, plan_replicas, route


def _max(load):
    return max(load)


@pytest.mark.parametrize("seed", range(20))
def test_plan_respects_budget_and_never_raises_the_peak(seed):
    rng = random.Random(seed)
    P = rng.choice([2, 4, 8])
    E = P * rng.choice([1, 2, 4])
    load = [int(rng.paretovariate(1.2) * 10) if rng.random() < 0.8 else 0 for _ in range(E)]
    slots = tuple(rng.sample(range(E), E))
    extra = rng.randint(0, E // P)
    plan = plan_replicas(load, slots, P, extra)
    ep = Plan.expert_parallel(E, P, slots)
    assert plan.slots == slots
    for e, h in enumerate(plan.holders):
        assert h[0] == ep.holders[e][0] and len(set(h)) == len(h) and list(h[1:]) == sorted(h[1:])
    for r in range(P):
        assert len(plan.held(r)) - E // P <= extra
    assert _max(plan.predicted_load(load)) <= _max(ep.predicted_load(load))
    assert plan == plan_replicas(list(load), slots, P, extra)  # deterministic


def test_one_hot_expert_is_replicated_everywhere():
    P, E = 4, 8
    load = [0] * E
    load[3] = 1000  # every token on expert 3 (owned by rank 1)
    plan = plan_replicas(load, tuple(range(E)), P, extra_slots=2)
    assert sorted(plan.holders[3]) == [0, 1, 2, 3]
    assert plan.replicas == 3 and max(plan.predicted_load(load)) == 250
    assert plan_replicas([0] * E, tuple(range(E)), P, 2).replicas == 0  # no tokens: nothing to balance


def test_zipf_load_balances_within_twenty_percent():
    P, E = 4, 8
    load = [int(1e6 / (k + 1) ** 1.5) for k in range(E)]
    plan = plan_replicas(load, tuple(range(E)), P, extra_slots=E // P)
    predicted = plan.predicted_load(load)
    assert max(predicted) / (sum(predicted) / P) <= 1.2
    assert max(Plan.expert_parallel(E, P).predicted_load(load)) / (sum(load) / P) > 2.5


def test_route_keeps_local_rows_and_splits_the_rest_evenly():
    P, E = 4, 8
    plan = Plan(tuple(range(E)), ((0, 1, 2, 3), (0,), (1,), (1, 3), (2,), (2,), (3,), (3,)), P)
    counts = [10, 3, 0, 7, 1, 0, 2, 5]
    for me in range(P):
        send, order = route(plan, me, counts)
        send = torch.tensor(send)
        assert send.sum(0).tolist() == counts  # every row goes somewhere, once
        assert sorted(order.tolist()) == list(range(sum(counts)))
        assert send[me, 0] == 10  # expert 0 is everywhere: its rows stay
        if me not in (1, 3):  # expert 3 lives on ranks 1 and 3: 7 rows split 4/3 or 3/4
            assert sorted([int(send[1, 3]), int(send[3, 3])]) == [3, 4]
        for q in range(P):  # rows for q arrive in q's held order
            held = plan.held(q)
            assert all(send[q, e] == 0 for e in range(E) if e not in held)
    # rank 2 holds expert 0 itself: the first rows it sends (to rank 0) are its expert-1 rows, in order
    send, order = route(plan, 2, counts)
    assert send[2][0] == 10 and order[:3].tolist() == [10, 11, 12]


def test_balanced_slots_spreads_the_hot_experts():
    slots = balanced_slots([80, 80, 1, 1, 1, 1, 1, 1], 2)
    assert sorted(slots) == list(range(8))
    assert {0, 1} & set(slots[:4]) and {0, 1} & set(slots[4:])  # one hot expert per rank
    assert balanced_slots([0] * 8, 4) == tuple(range(8))  # no load: expert order


def test_fssdp_config_errors():
    with pytest.raises(ConfigError, match="parallel.ep >= 2"):
        config.load(None, ['moe.placement="fssdp"'])
    with pytest.raises(ConfigError, match="moe.fssdp.window=0"):
        config.load(None, ['moe.placement="fssdp"', "parallel.ep=2", "moe.fssdp.window=0"])
    with pytest.raises(ConfigError, match="placement"):
        config.load(None, ['moe.placement="pinned"'])
