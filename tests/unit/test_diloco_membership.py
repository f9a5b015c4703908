"""Elastic DiLoCo membership through a real TCP store, workers as threads of this process: the first
epoch waits for everyone expected, a late worker is left out and asks to join, the members let it
in at their next re-form, and a group of members that lost one freezes without it."""

import threading

import pytest
import torch

from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.elastic import Membership, connect_store
from expertmesh.testing import free_port


@pytest.fixture
def address():
    addr = f"127.0.0.1:{free_port()}"
    store = connect_store(addr, 30.0, serve=True)
    yield addr
    del store


def _in_threads(calls):
    out, errors = [None] * len(calls), []

    def call(i, fn):
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def _sum_over(members):
    """Every member all-reduces its worker index over its outer group."""
    def one(m):
        t = torch.tensor([float(m.worker)])
        Comm().all_reduce(t, m.group, "test")
        return t.item()
    return _in_threads([lambda m=m: one(m) for m in members])


def test_late_worker_asks_and_is_let_in_then_a_lost_one_is_dropped(address):
    # Workers 0 and 1 start together and wait 5 s for worker 2 (a window no loaded machine misses); worker 2,
    # once it starts, would wait 20 s for members to let it in before going on alone.
    ms = [Membership(address, "run", w, 3, 0, timeout_s=20.0 if w == 2 else 5.0, settle_s=3.0) for w in range(3)]
    _in_threads([lambda m=m: m.form(member=False) for m in ms[:2]])  # worker 2 is not there yet
    assert [(m.epoch, m.members) for m in ms[:2]] == [(0, [0, 1]), (0, [0, 1])]
    assert _sum_over(ms[:2]) == [1.0, 1.0]
    assert not ms[0].someone_waiting()

    late = threading.Thread(target=ms[2].form, kwargs={"member": False})
    late.start()
    for _ in range(100):  # it registers for epoch 1 and raises its flag
        if ms[0].someone_waiting():
            break
        threading.Event().wait(0.05)
    assert ms[0].someone_waiting() and ms[1].someone_waiting()
    changes = _in_threads([lambda m=m: m.form(member=True) for m in ms[:2]])
    late.join(30)
    assert changes == [([], [2]), ([], [2])]
    assert [(m.epoch, m.members) for m in ms] == [(1, [0, 1, 2])] * 3
    assert _sum_over(ms) == [3.0] * 3
    assert not ms[0].someone_waiting()  # the joiner's flag is gone

    ms[1].close()  # worker 1 is gone: the other two re-form without it once settle_s has passed
    changes = _in_threads([lambda m=m: m.form(member=True) for m in (ms[0], ms[2])])
    assert changes == [([1], []), ([1], [])]
    assert ms[0].members == ms[2].members == [0, 2] and ms[0].epoch == 2
    assert _sum_over([ms[0], ms[2]]) == [2.0, 2.0]


def _model(cfg, seed):
    from expertmesh.models.transformer import Transformer

    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def _workers(address, n, secret=None, timeout_s=3.0):
    """n elastic DiLoCo workers of one tiny model (the same initial weights), one rank each, in this process."""
    from expertmesh import config
    from expertmesh.dist.diloco import DiLoCo

    cfg = config.load(None, ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64",
                             "moe.num_experts=4", "moe.expert_dim=32", "diloco.enabled=true"])
    out = []
    for w in range(n):
        m = Membership(address, "run", w, n + 1, 0, timeout_s=timeout_s, settle_s=2.0, secret=secret)
        out.append(DiLoCo(_model(cfg, seed=0), cfg.model.n_layers, cfg.diloco, None, Comm(), m))
    return out, cfg


def _forger(address, cfg, secret):
    """A fourth process that says it was a member, 500 outer steps and 9,999 inner steps along, with other weights."""
    from expertmesh.dist.diloco import DiLoCo

    m = Membership(address, "run", 3, 4, 0, timeout_s=20.0, settle_s=2.0, secret=secret)
    d = DiLoCo(_model(cfg, seed=1), cfg.model.n_layers, cfg.diloco, None, Comm(), m)
    d.was_member, d.outer_steps = True, 500
    return d


def _after_first_outer_steps(members):
    """The members' global state moves off the initial one, as outer steps do, identically in each."""
    for d in members:
        d.outer_steps = 3
        d.global_copy = [g + 0.5 for g in d.global_copy]
    return [torch.cat(d.global_copy).clone() for d in members]


def test_a_process_claiming_to_be_a_member_neither_leads_nor_changes_the_members(address):
    members, cfg = _workers(address, 3)
    assert _in_threads([lambda d=d: d.start(0) for d in members]) == [0, 0, 0]
    assert [d.membership.members for d in members] == [[0, 1, 2]] * 3
    before = _after_first_outer_steps(members)

    forger = _forger(address, cfg, None)
    joining = threading.Thread(target=lambda: setattr(forger, "took", forger.start(9999)))
    joining.start()
    for _ in range(200):
        if members[0].membership.someone_waiting():
            break
        threading.Event().wait(0.05)
    assert _in_threads([lambda d=d: d._reform(40, failed=False) for d in members]) == [40, 40, 40]
    joining.join(30)
    assert forger.membership.members == [0, 1, 2, 3] and forger.membership.previous == [0, 1, 2]
    for d, b in zip(members, before, strict=True):
        assert torch.equal(torch.cat(d.global_copy), b)  # nobody took the forger's state
    assert forger.took == 40 and forger.outer_steps == 3  # it took the members' step and state instead
    assert torch.equal(torch.cat(forger.global_copy), before[0])


@pytest.mark.parametrize("secret", [None, b"another secret of 24 bytes"], ids=["without", "another"])
def test_with_a_secret_a_process_without_it_is_refused(address, secret):
    from expertmesh.dist.elastic import Refused

    members, cfg = _workers(address, 3, secret=b"the group's secret, 28 bytes")
    assert _in_threads([lambda d=d: d.start(0) for d in members]) == [0, 0, 0]
    before = _after_first_outer_steps(members)
    forger = _forger(address, cfg, secret)
    with pytest.raises(Refused, match="diloco.secret_file (is not set|differs from the group's)"):
        forger.start(9999)
    store = members[0].membership.store
    assert not members[0].membership.someone_waiting()  # the refused process left no join request they see
    store.set("run/want/w3", "1")  # a join request written by hand, unsigned: the members do not see it
    assert not members[0].membership.someone_waiting()
    for d, b in zip(members, before, strict=True):
        assert torch.equal(torch.cat(d.global_copy), b)
