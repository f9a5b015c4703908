"""A WAN lab on one machine: two "sites" as network namespaces joined by a veth pair whose two ends are
rate-limited with `tc` (a token bucket, `tbf`, on each end: this kernel has no `netem`, so there is
rate but no added delay), and a job launched per site through expertmesh's own launcher (one torchrun
agent per site, static rendezvous over the link, gloo bound to the site's end of the link).

With three sites or more, each site has one uplink into a switch (a bridge in a namespace of its own) and
its links to the other sites are `htb` classes on that uplink, one per peer (filtered by the peer's
address), each with its own rate:

    with Lab(("a", "b", "c")) as lab:
        lab.shape_links({("a", "b"): 50, ("a", "c"): 2, ("b", "c"): 50})   # Mbit/s, both ways
        lab.class_bytes()                   # {(site, peer): bytes site sent to peer}

    with Lab() as lab:
        lab.shape(10)                       # Mbit/s both ways; None: unshaped
        procs = lab.launch(overrides, nproc=2)
        ...
        lab.link_bytes()                    # {site: bytes its end of the link sent}
        address = lab.store()               # elastic DiLoCo: a store at site a, a worker job per site
        lab.worker("b", overrides + ["diloco.worker=1", f'diloco.store="{address}"'])
        lab.set_link(False)                 # cut the link (True: restore it)

Needs root and iproute2 (`ip netns`, `tc`); `Lab()` refuses in one line otherwise. Everything made for
the lab (namespaces, the link with them, processes started in them) is removed on exit, also on failure.
Traffic stays inside the namespaces: nothing outside them is addressed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def counted_bytes(run: Path, label: str) -> float:
    """The bytes rank 0 sent under `label` over a run, from its metrics (`comm_bytes_per_step` is a mean over
    the steps since the previous record)."""
    total, prev = 0.0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            total += (rec["step"] - prev) * rec["comm_bytes_per_step"].get(label, 0)
            prev = rec["step"]
    return total


# elastic DiLoCo workers, one per site, that notice a silent peer within 4 s (the lab's link has no delay)
ELASTIC = ["diloco.enabled=true", "diloco.sync_every=4", "diloco.fragments=2", "diloco.overlap=1",
           "diloco.quant_bits=4", "diloco.elastic=true", "diloco.workers=2", "diloco.timeout_s=4",
           "diloco.settle_s=2"]


def reached(run: Path, step: int) -> bool:
    """The run has logged a train record of `step` (metrics.log_every=1)."""
    path = run / "metrics.jsonl"
    return path.exists() and any(json.loads(line).get("step") == step and json.loads(line)["kind"] == "train"
                                 for line in path.read_text().splitlines())


class LabUnavailable(RuntimeError):
    pass


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def available() -> str:
    """Why the lab cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return f"the WAN lab builds network namespaces and needs root (euid {os.geteuid()})"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the WAN lab needs iproute2: {', '.join(missing)} not found on PATH"
    probe = f"emlabprobe{os.getpid() % 100000}"  # root in a container may still lack CAP_NET_ADMIN
    made = _run("ip", "netns", "add", probe, check=False)
    _run("ip", "netns", "del", probe, check=False)
    if made.returncode:
        return f"the WAN lab cannot make a network namespace here: {made.stderr.strip() or made.returncode}"
    return ""


class Lab:
    """Sites (two by default, `a` and `b`) and the links between them. The first site's address is the
    rendezvous address."""

    def __init__(self, sites: tuple[str, ...] = ("a", "b"), tag: str | None = None) -> None:
        why = available()
        if why:
            raise LabUnavailable(why)
        if len(sites) < 2 or len(set(sites)) != len(sites) or not all(s.isalnum() and len(s) <= 3 for s in sites):
            raise ValueError(f"a lab needs two or more distinct sites named by 1-3 letters or digits, got {sites}")
        self.SITES = tuple(sites)
        tag = tag or str(os.getpid() % 100000)
        self.ns = {s: f"emlab{tag}{s}" for s in self.SITES}
        self.dev = {s: f"emw{tag}{s}" for s in self.SITES}  # interface names: at most 15 characters
        net = 1 + int(tag) % 250
        self.addr = {s: f"10.213.{net}.{i + 1}" for i, s in enumerate(self.SITES)}
        # three sites or more: each uplink's other end sits in the switch's namespace, on its bridge
        self.switch = f"emlab{tag}sw" if len(self.SITES) > 2 else None
        self.procs: list[subprocess.Popen] = []
        self.rate_mbit: float | None = None

    def __enter__(self) -> Lab:
        try:
            for s in self.SITES:
                _run("ip", "netns", "add", self.ns[s])
            if self.switch is None:
                a, b = self.SITES
                _run("ip", "link", "add", self.dev[a], "type", "veth", "peer", "name", self.dev[b])
            else:
                _run("ip", "netns", "add", self.switch)
                _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
                _run("ip", "-n", self.switch, "link", "set", "br0", "up")
                for s in self.SITES:
                    port = f"{self.dev[s]}p"
                    _run("ip", "link", "add", self.dev[s], "type", "veth", "peer", "name", port)
                    _run("ip", "link", "set", port, "netns", self.switch)
                    _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
                    _run("ip", "-n", self.switch, "link", "set", port, "up")
            for s in self.SITES:
                _run("ip", "link", "set", self.dev[s], "netns", self.ns[s])
                _run("ip", "-n", self.ns[s], "addr", "add", f"{self.addr[s]}/24", "dev", self.dev[s])
                _run("ip", "-n", self.ns[s], "link", "set", "lo", "up")
                _run("ip", "-n", self.ns[s], "link", "set", self.dev[s], "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs = []
        for ns in [*self.ns.values(), *([self.switch] if self.switch else [])]:  # links go with namespaces
            _run("ip", "netns", "del", ns, check=False)

    def shape(self, mbit: float | None) -> None:
        """Limits each end of the link to `mbit` Mbit/s (a token bucket: bursts of at most 1/50 s of it, and
        not below 16 KB); None removes the limit."""
        self.rate_mbit = mbit
        for s in self.SITES:
            ns, dev = self.ns[s], self.dev[s]
            if mbit is None:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                continue
            burst = max(16 * 1024, int(mbit * 1e6 / 8 / 50))
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                 f"{mbit}mbit", "burst", str(burst), "latency", "2s")

    def shape_links(self, rates: dict[tuple[str, str], float]) -> None:
        """Gives each pair of sites its own link rate in Mbit/s, both ways (pairs not named stay unshaped): on
        each site's uplink an `htb` root whose class 1:<i+10> carries what goes to the i-th site, at that
        pair's rate (ceil = rate: it borrows nothing), and a default class (1:2, 10 Gbit/s) for the rest."""
        pairs = {frozenset(p): float(r) for p, r in rates.items()}
        unknown = sorted({x for p in pairs for x in p} - set(self.SITES))
        if unknown or any(len(p) != 2 for p in pairs) or any(r <= 0 for r in pairs.values()):
            raise ValueError(f"shape_links: pairs of two distinct sites among {self.SITES} with rates > 0, got {rates}")
        self.rate_mbit = None
        for s in self.SITES:
            tc = ["ip", "netns", "exec", self.ns[s], "tc"]
            _run(*tc, "qdisc", "del", "dev", self.dev[s], "root", check=False)
            _run(*tc, "qdisc", "add", "dev", self.dev[s], "root", "handle", "1:", "htb", "default", "2")
            _run(*tc, "class", "add", "dev", self.dev[s], "parent", "1:", "classid", "1:2", "htb", "rate", "10gbit",
                 "quantum", "60000")
            for i, peer in enumerate(self.SITES):
                mbit = pairs.get(frozenset((s, peer)))
                if mbit is None or peer == s:
                    continue
                burst = max(16 * 1024, int(mbit * 1e6 / 8 / 50))
                cls = f"1:{i + 10:x}"  # tc reads class minors as hexadecimal
                _run(*tc, "class", "add", "dev", self.dev[s], "parent", "1:", "classid", cls, "htb", "rate",
                     f"{mbit}mbit", "ceil", f"{mbit}mbit", "burst", str(burst), "cburst", str(burst))
                _run(*tc, "filter", "add", "dev", self.dev[s], "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                     "match", "ip", "dst", f"{self.addr[peer]}/32", "flowid", cls)

    def class_bytes(self) -> dict[tuple[str, str], int]:
        """Bytes each site sent to each peer whose link `shape_links` shaped (the htb class's own counter)."""
        out = {}
        for s in self.SITES:  # this tc prints htb classes as text only, also when asked for JSON
            text = _run("ip", "netns", "exec", self.ns[s], "tc", "-s", "class", "show", "dev", self.dev[s]).stdout
            for handle, sent in re.findall(r"^class htb 1:([0-9a-f]+) .*\n\s*Sent (\d+) bytes", text, re.M):
                minor = int(handle, 16)
                if minor >= 10:
                    out[(s, self.SITES[minor - 10])] = int(sent)
        return out

    def set_link(self, up: bool) -> None:
        """Cuts (or restores) the link: both ends down (up)."""
        for s in self.SITES:
            _run("ip", "-n", self.ns[s], "link", "set", self.dev[s], "up" if up else "down")

    def link_bytes(self) -> dict[str, int]:
        """Bytes each site's end of the link has sent (the interface's own counter, Ethernet frames)."""
        out = {}
        for s in self.SITES:
            info = json.loads(_run("ip", "-n", self.ns[s], "-s", "-j", "link", "show", "dev", self.dev[s]).stdout)
            out[s] = int(info[0]["stats64"]["tx"]["bytes"])
        return out

    def popen(self, site: str, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Starts `argv` inside `site`'s namespace (its own process group, killed on close)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[site], *argv], env=env, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def _env(self, site: str, **extra: str) -> dict:
        env = dict(os.environ, GLOO_SOCKET_IFNAME=self.dev[site], OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def store(self, port: int = 29600) -> str:
        """Serves an elastic DiLoCo store (`expertmesh diloco-store`) at site a; returns its address."""
        first = self.SITES[0]
        address = f"{self.addr[first]}:{port}"
        p = self.popen(first, [sys.executable, "-m", "expertmesh.launch.cli", "diloco-store", address],
                       env=self._env(first), cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"the DiLoCo store at {address} did not start: {line!r}")
        return address

    def worker(self, site: str, overrides: list[str], nproc: int = 1, stdout=None, **env: str) -> subprocess.Popen:
        """An elastic DiLoCo worker at `site`: its own `expertmesh run --nproc nproc` job (torchrun inside the
        site), its outer group over the link."""
        argv = [sys.executable, "-m", "expertmesh.launch.cli", "run", "--nproc", str(nproc), *overrides]
        return self.popen(site, argv, env=self._env(site, **env), cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT,
                          text=True)

    def elastic_pair(self, tmp: Path, overrides: list[str], events, timeout: float = 600.0) -> tuple[list, list]:
        """Elastic DiLoCo worker 0 at site a (beside the store) and worker 1 at site b, both running `overrides`
        (logs in `tmp`). `events`: [(step, ready, act, workers)]: the `workers` hold after `step` until ready()
        is true and act() has run (a cut link, a slower one), whatever the machine's speed. Returns (exit codes,
        logs)."""
        address = self.store()
        files = [tmp / f"event{i}" for i in range(len(events))]
        logs = [tmp / f"worker{w}.log" for w in (0, 1)]
        procs = []
        for w, site in enumerate(self.SITES):
            hold = ",".join(f"{step}:{f}" for (step, _, _, who), f in zip(events, files, strict=True) if w in who)
            with logs[w].open("w") as out:
                procs.append(self.worker(site, [*overrides, f"diloco.worker={w}", f'diloco.store="{address}"'],
                                         stdout=out, EXPERTMESH_HOLD_AT=hold))
        deadline = time.monotonic() + timeout
        for (step, ready, act, _), f in zip(events, files, strict=True):
            while not ready():
                dead = {w: p.returncode for w, p in enumerate(procs) if p.poll() is not None}
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"elastic pair: waiting for the event after step {step}: exited {dead} or "
                                       f"timed out\n" + "\n".join(log.read_text()[-3000:] for log in logs))
                time.sleep(0.1)
            act()
            f.touch()
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        return codes, [log.read_text() for log in logs]

    def cut_events(self, run: Path, tmp: Path, at: int, until: int, rejoin: int) -> list:
        """elastic_pair's events for a cut link: after step `at` (both held) the link goes down; after step
        `until` both hold until worker 0 has re-formed alone and worker 1 found the store out of reach, then the
        link comes back; after step `rejoin` worker 0 holds until worker 1 has asked to rejoin, so that the two
        meet before either finishes."""
        logs = [tmp / f"worker{w}.log" for w in (0, 1)]
        both_at = lambda: all(reached(run / f"worker{w}", at) for w in (0, 1))  # noqa: E731
        return [(at, both_at, lambda: self.set_link(False), (0, 1)),
                (until, lambda: "left at step" in logs[0].read_text() and "trains alone" in logs[1].read_text(),
                 lambda: self.set_link(True), (0, 1)),
                (rejoin, lambda: "asks to rejoin" in logs[1].read_text(), lambda: None, (0,))]

    def launch(self, overrides: list[str], nproc: int = 2, port: int = 29511, stdout=None, stderr=None,
               module: str = "expertmesh.launch.train") -> list[subprocess.Popen]:
        """One torchrun agent per site (expertmesh.launch.agent), `nproc` ranks each, static rendezvous at the
        first site's address; ranks in the order of the sites (with `parallel.dp_replicate` = the number of
        sites, a DiLoCo worker per site)."""
        procs = []
        for rank, s in enumerate(self.SITES):
            env = self._env(s)
            argv = [sys.executable, "-m", "expertmesh.launch.agent", f"--nnodes={len(self.SITES)}",
                    f"--nproc-per-node={nproc}", "--rdzv-backend=static",
                    f"--master-addr={self.addr[self.SITES[0]]}", f"--master-port={port}",
                    f"--node-rank={rank}", "-m", module, *overrides]
            procs.append(self.popen(s, argv, env=env, cwd=ROOT, stdout=stdout, stderr=stderr, text=True))
        return procs
