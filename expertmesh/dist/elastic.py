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

A worker that finds itself outside a frozen list tries the next epoch.

A cut link. A worker whose outer group broke and that cannot reach the store either (a fresh TCP
connection to it fails within `settle_s`) trains alone, *detached*: no store key is read or written
(a request to a store behind a cut link would block for the store's timeout). At each of its syncs it
tries the store again; once it answers, the worker joins as a (re)starting worker does: it raises its
join flag through a new connection, the members let it in at their next sync, and, not having been in
the last group that connected, it takes the leader's state. The workers on the store's side of the cut
re-form without it and train on. A (re)starting worker also
raises `want/w<w>`; the members look for such flags at every sync and, all agreeing, re-form at the
next epoch to let it in. Members re-form too when a collective on the outer group fails (a worker
left). After every re-form the members compare (step, outer steps, state digest) and the one furthest
along sends its global state to those that differ (diloco.py), so a joiner contributes only once it
holds the global copies.

Who may lead comes from the store, not from the workers' own claims: the freezer of epoch E writes,
beside its member list, the members of the last epoch that connected (`last`, set by the members once
their group is up); only those may hand their state over (`previous`).

Trust boundary. Without a secret the store is trusted: any process that reaches it and follows the
protocol may join (and takes the members' state; it never leads a group it was not in). With
`diloco.secret_file` every record a worker writes (registration, join request, member lists) and every
row of the leader election carries an HMAC-SHA256 under the shared secret; records that do not verify
are ignored, and a worker whose secret differs from the group's is refused in one line. The secret
authenticates membership, leadership and the state hand-over; it neither encrypts nor authenticates
the pseudo-gradient traffic, and a process that can write to the store can still stall the group
(deleting keys, raising the epoch): run the store and the outer group on a network you control.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import socket
import time
from pathlib import Path

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


def read_secret(path: str) -> bytes | None:
    """The shared secret of `diloco.secret_file` (surrounding whitespace dropped); None without one."""
    if not path:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as err:
        raise ValueError(f"diloco.secret_file={path!r} cannot be read: {err.strerror}") from None
    if len(secret) < 16:
        raise ValueError(f"diloco.secret_file={path!r} holds {len(secret)} bytes; a secret needs at least 16")
    return secret


class Refused(RuntimeError):
    """This worker cannot join: its secret is not the group's."""


class Signer:
    """HMAC-SHA256 of store records and election rows under the shared secret; without a secret every
    record reads "1" and verifies."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret

    def mac(self, text: str) -> str:
        if self.secret is None:
            return "1"
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    def verifies(self, value: str | bytes, text: str) -> bool:
        value = value.decode() if isinstance(value, bytes) else value
        return hmac.compare_digest(value, self.mac(text))

    def row_mac(self, text: str) -> list[int]:
        """32 MAC bytes for an election row (zeros without a secret)."""
        if self.secret is None:
            return [0] * 32
        return list(hmac.new(self.secret, text.encode(), hashlib.sha256).digest())

    def record(self, key: str, payload) -> str:
        """`payload` as JSON with its MAC bound to the store key it is written under."""
        body = json.dumps(payload, sort_keys=True)
        return json.dumps({"body": body, "mac": self.mac(f"{key}\n{body}")})

    def read(self, key: str, value: bytes):
        """The payload of a `record`, or None when it does not verify."""
        try:
            outer = json.loads(value)
            body, mac = outer["body"], outer["mac"]
        except (ValueError, KeyError, TypeError):
            return None
        return json.loads(body) if isinstance(mac, str) and self.verifies(mac, f"{key}\n{body}") else None


class Membership:
    """One worker's view of the outer group. Rank 0 of the worker registers it; every rank builds its
    own outer group (`group`: None while the worker is alone). `previous`: the workers of this epoch
    that were members of the last connected group (those that may lead)."""

    def __init__(self, address: str, run: str, worker: int, workers: int, rank: int, timeout_s: float,
                 settle_s: float, worker_group=None, comm: Comm | None = None, secret: bytes | None = None) -> None:
        self.run, self.worker, self.workers, self.rank = run, worker, workers, rank
        self.signer = Signer(secret)
        self.comm = comm or Comm()
        self.timeout_s, self.settle_s = timeout_s, settle_s
        self.worker_group = worker_group  # this worker's own ranks (None: one rank)
        # The store's own timeout bounds every wait on it; joiners may wait for a whole sync period.
        self.address = address
        self.store = connect_store(address, max(timeout_s, 60.0) * 10)
        self._peek: dist.TCPStore | None = None  # its own connection for the join flags: bounded by timeout_s
        self.detached = False  # the store was out of reach at the last re-form: training alone
        self.epoch = -1
        self.members: list[int] = []
        self.previous: list[int] = []
        self.group: StoreGroup | None = None

    def _key(self, *parts) -> str:
        return "/".join((self.run, *map(str, parts)))

    def someone_waiting(self) -> bool:
        """A worker outside the group has asked to join (detached: the store answers again, so this worker
        may ask). A store that does not answer within timeout_s raises RuntimeError, as a broken group does."""
        if self.detached:
            return self.reachable()
        if self._peek is None:
            self._peek = connect_store(self.address, self.timeout_s)
        try:
            for w in range(self.workers):
                key = self._key("want", f"w{w}")
                if (w not in self.members and self._peek.check([key])
                        and self.signer.verifies(self._peek.get(key), key)):
                    return True
        except RuntimeError:
            self._peek = None  # a request may be left unanswered on it: never reuse that connection
            raise
        return False

    def reachable(self) -> bool:
        """The store accepts a fresh TCP connection within settle_s (behind a cut link it does not)."""
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=self.settle_s):
                return True
        except OSError:
            return False

    def form(self, member: bool) -> tuple[list[int], list[int]]:
        """Joins the next epoch that takes this worker; `member`: re-forming a group this worker was in
        (waits settle_s for the others), else starting or restarting (waits timeout_s). Returns the
        workers that (left, joined) against the previous group."""
        old = self.members
        self.close()  # at once: peers still blocked on the old group fail now, not at their timeout
        rejoining = self.detached
        if rejoining:  # back in reach: a new connection (the old one may hold an unanswered request)
            log.warning("DiLoCo: the store at %s answers again; worker %d asks to rejoin", self.address, self.worker)
            self.store, self._peek = connect_store(self.address, max(self.timeout_s, 60.0) * 10), None
            member = False  # not in the group the others formed meanwhile: join as a restarting worker does
        while True:
            info = [0, [], [], None, False]
            if self.rank == 0:
                try:
                    if member and not self.reachable():
                        info = [self.epoch, [self.worker], [self.worker], None, True]
                    else:
                        info = [*self._register(member), False]
                        # nobody came within timeout_s: still apart from the others (who may lead, and must not
                        # take this worker's state); it asks again at its next sync
                        info[4] = rejoining and info[1] == [self.worker] and self.workers > 1
                except Refused as err:
                    info = [0, [], [], str(err), False]
            if self.worker_group is not None:  # every rank of this worker takes the same epoch
                info = self.comm.broadcast_object(info, dist.get_global_rank(self.worker_group, 0),
                                                  self.worker_group)
            if info[3] is not None:
                raise Refused(info[3])
            self.epoch, self.members, self.previous, _, self.detached = info
            me = self.members.index(self.worker)
            self.group = None
            if self.detached:
                if rejoining:
                    log.warning("DiLoCo: no member answered worker %d's request to rejoin (epoch %d); it trains "
                                "alone and asks again at its next sync", self.worker, self.epoch)
                else:
                    log.warning("DiLoCo: the store at %s is out of reach; worker %d trains alone until it answers",
                                self.address, self.worker)
                return [w for w in old if w != self.worker], []
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
            # the members of the group now connected: those of the next epoch that may lead
            self.store.set(self._key("last"), self.signer.record(self._key("last"), [self.epoch, self.members]))
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

    def _want(self) -> None:
        key = self._key("want", f"w{self.worker}")
        self.store.set(key, self.signer.mac(key))

    def _register(self, member: bool) -> list:
        if not member:
            last = self._key("last")
            if self.store.check([last]) and self.signer.read(last, self.store.get(last)) is None:
                why = ("differs from the group's" if self.signer.secret else
                       "is not set, and the group signs its records")
                raise Refused(f"DiLoCo: the outer group's records do not verify under this worker's secret "
                              f"(diloco.secret_file {why}); worker {self.worker} does not join")
            self._want()
        e = self.epoch + 1
        if not member and self.store.check([self._key("epoch")]):
            e = max(e, int(self.store.get(self._key("epoch"))) + 1)
        while True:
            frozen = self._register_in(e, self.settle_s if member else self.timeout_s)
            if frozen is not None and self.worker in frozen["members"]:
                self.store.set(self._key("epoch"), str(e))
                return [e, frozen["members"], frozen["previous"], None]
            if frozen is None:
                log.warning("DiLoCo: the member list of epoch %d does not verify; ignoring that epoch", e)
            else:  # frozen without this worker (it came late): the members will see want/ and re-form
                self._want()
            e += 1

    def _register_in(self, e: int, wait_s: float) -> dict | None:
        """Registers for epoch `e` and returns its frozen record ({"members", "previous"}), None when the
        record does not verify."""
        prefix = self._key(f"e{e}")
        self.store.set(f"{prefix}/w{self.worker}", self.signer.mac(f"{prefix}/w{self.worker}"))
        self.store.add(f"{prefix}/count", 1)
        deadline = time.monotonic() + wait_s
        frozen = f"{prefix}/frozen"
        while not self.store.check([frozen]):
            if self.store.add(f"{prefix}/count", 0) >= self.workers or time.monotonic() >= deadline:
                present = [w for w in range(self.workers) if self.store.check([f"{prefix}/w{w}"])
                           and self.signer.verifies(self.store.get(f"{prefix}/w{w}"), f"{prefix}/w{w}")]
                self.store.compare_set(frozen, "", self.signer.record(frozen, {
                    "members": present, "previous": [w for w in self._last() if w in present]}))
                break
            time.sleep(0.05)
        return self.signer.read(frozen, self.store.get(frozen))

    def _last(self) -> list[int]:
        """The members of the last group that connected, as its members recorded them ([] if none did)."""
        key = self._key("last")
        if not self.store.check([key]):
            return []
        last = self.signer.read(key, self.store.get(key))
        if last is None:
            log.warning("DiLoCo: the store's record of the last members does not verify; nobody counts as one")
            return []
        return last[1]
