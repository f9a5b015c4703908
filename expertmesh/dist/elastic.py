"""Who is in the outer group: elastic membership for DiLoCo workers that are separate jobs.

Each worker is its own `torchrun` job (any number of ranks inside); rank r of every worker meets rank
r of the others in an outer process group. The workers find each other through a TCP store that a
small standalone process serves (`expertmesh diloco-store`), so no worker is special and any of
them may fail. Membership changes in *epochs*:

  register    worker w's rank 0 sets `e<E>/w<w>` and adds 1 to `e<E>/count`
  freeze      once every expected worker has registered, or after a wait (`settle_s` for workers
              re-forming an existing group, `timeout_s` for a worker starting or restarting), the first
              to get there compare-and-sets `e<E>/frozen` to the list of registered workers; everyone
              reads that one list
  connect     rank r of each listed worker builds a gloo group under the prefix `e<E>/r<r>/`

A worker that finds itself outside a frozen list tries the next epoch. A (re)starting worker also
raises `want/w<w>`; the members look for such flags at every sync and, all agreeing, re-form at the
next epoch to let it in. Members re-form too when a collective on the outer group fails (a worker
left). After every re-form the members compare (step, outer steps, state digest) and the one furthest
along sends its global state to those that differ (diloco.py), so a joiner contributes only once it
holds the global copies.
"""

from __future__ import annotations

import datetime
import json
import logging
import time

import torch.distributed as dist

from expertmesh.dist.comm_stats import Comm, StoreGroup

log = logging.getLogger(__name__)


def connect_store(address: str, timeout_s: float, serve: bool = False) -> dist.TCPStore:
    host, _, port = address.rpartition(":")
    return dist.TCPStore(host, int(port), is_master=serve, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True)


def serve_store(address: str) -> None:
    """Runs the store until killed (`expertmesh diloco-store`)."""
    store = connect_store(address, 60.0, serve=True)
    log.info("DiLoCo store serving on %s", address)
    print(f"diloco store listening on {address}", flush=True)
    while store is not None:  # the store lives as long as this reference
        time.sleep(3600)


class Membership:
    """One worker's view of the outer group. Rank 0 of the worker registers it; every rank builds its
    own outer group (`group`: None while the worker is alone)."""

    def __init__(self, address: str, run: str, worker: int, workers: int, rank: int, timeout_s: float,
                 settle_s: float, worker_group=None, comm: Comm | None = None) -> None:
        self.run, self.worker, self.workers, self.rank = run, worker, workers, rank
        self.comm = comm or Comm()
        self.timeout_s, self.settle_s = timeout_s, settle_s
        self.worker_group = worker_group  # this worker's own ranks (None: one rank)
        # The store's own timeout bounds every wait on it; joiners may wait for a whole sync period.
        self.store = connect_store(address, max(timeout_s, 60.0) * 10)
        self.epoch = -1
        self.members: list[int] = []
        self.group: StoreGroup | None = None

    def _key(self, *parts) -> str:
        return "/".join((self.run, *map(str, parts)))

    def someone_waiting(self) -> bool:
        """A worker outside the group has asked to join."""
        return any(self.store.check([self._key("want", f"w{w}")]) for w in range(self.workers)
                   if w not in self.members)

    def form(self, member: bool) -> tuple[list[int], list[int]]:
        """Joins the next epoch that takes this worker; `member`: re-forming a group this worker was in
        (waits settle_s for the others), else starting or restarting (waits timeout_s). Returns the
        workers that (left, joined) against the previous group."""
        old = self.members
        self.close()  # at once: peers still blocked on the old group fail now, not at their timeout
        while True:
            info = [0, []]
            if self.rank == 0:
                info = self._register(member)
            if self.worker_group is not None:  # every rank of this worker takes the same epoch
                info = self.comm.broadcast_object(info, dist.get_global_rank(self.worker_group, 0),
                                                  self.worker_group)
            self.epoch, self.members = info
            me = self.members.index(self.worker)
            self.group = None
            if len(self.members) == 1:
                break
            try:
                self.group = StoreGroup(self.store, self._key(f"e{self.epoch}", f"r{self.rank}", ""), me,
                                        len(self.members), self.timeout_s)
                break
            except RuntimeError as err:  # a listed worker never connected: it died meanwhile
                log.warning("DiLoCo: the outer group of epoch %d did not connect (%s); forming again",
                            self.epoch, str(err).splitlines()[0][:200])
                member = True
        if self.rank == 0:
            self.store.delete_key(self._key("want", f"w{self.worker}"))
        left = [w for w in old if w not in self.members]
        joined = [w for w in self.members if w not in old and w != self.worker] if old else []
        return left, joined

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.pg.abort()
            except RuntimeError:
                pass
            self.group = None

    def _register(self, member: bool) -> list:
        if not member:
            self.store.set(self._key("want", f"w{self.worker}"), "1")
        e = self.epoch + 1
        if not member and self.store.check([self._key("epoch")]):
            e = max(e, int(self.store.get(self._key("epoch"))) + 1)
        while True:
            members = self._register_in(e, self.settle_s if member else self.timeout_s)
            if self.worker in members:
                self.store.set(self._key("epoch"), str(e))
                return [e, members]
            # Frozen without this worker (it came late): the members will see want/ and re-form.
            self.store.set(self._key("want", f"w{self.worker}"), "1")
            e += 1

    def _register_in(self, e: int, wait_s: float) -> list[int]:
        prefix = self._key(f"e{e}")
        self.store.set(f"{prefix}/w{self.worker}", "1")
        self.store.add(f"{prefix}/count", 1)
        deadline = time.monotonic() + wait_s
        frozen = f"{prefix}/frozen"
        while not self.store.check([frozen]):
            if self.store.add(f"{prefix}/count", 0) >= self.workers or time.monotonic() >= deadline:
                present = [w for w in range(self.workers) if self.store.check([f"{prefix}/w{w}"])]
                self.store.compare_set(frozen, "", json.dumps(present))
                break
            time.sleep(0.05)
        return json.loads(self.store.get(frozen))
