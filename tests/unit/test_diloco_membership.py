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
