"""Every finished run exits 0: N consecutive 4-rank `expertmesh run` jobs and M two-node jobs (two torchrun
agents on this machine with static rendezvous, 2 ranks each), 5 steps each, counted by exit code. A job that
trained to the end and then aborted at exit ("terminate called without an active exception") shows as a
non-zero code with its message.

    .venv/bin/python tests/exit_stress.py [--runs 20] [--nodes-runs 10]

Prints one line per job and a summary; exits 1 if any job failed. Not part of `make test` (about 12 minutes
here); in the suite every `expertmesh run` and torchrun job already asserts exit code 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import failure, tiny_overrides  # noqa: E402

from expertmesh.testing import free_port  # noqa: E402


def one_node(run_dir: Path, name: str, steps: int = 5) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "expertmesh.launch.cli", "run", "--nproc", "4", *tiny_overrides(run_dir),
           f"train.steps={steps}", "parallel.ep=2", "metrics.log_every=1", f"train.name={name}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def two_nodes(run_dir: Path, name: str, steps: int = 5) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents (the launcher's own), static rendezvous over loopback, 2 ranks each."""
    port = free_port()
    args = [*tiny_overrides(run_dir), f"train.steps={steps}", "parallel.ep=2", f"train.name={name}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "expertmesh.launch.agent", "--nnodes=2", "--nproc-per-node=2",
                               "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}",
                               f"--node-rank={node}", "-m", "expertmesh.launch.train", *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--nodes-runs", type=int, default=10)
    a = p.parse_args()
    bad = 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            r = one_node(Path(tmp), f"one{i}")
            bad += r.returncode != 0
            print(f"4-rank job {i}: exit {r.returncode}" + ("" if r.returncode == 0 else "\n" + failure(r)), flush=True)
        for i in range(a.nodes_runs):
            for node, r in enumerate(two_nodes(Path(tmp), f"two{i}")):
                bad += r.returncode != 0
                print(f"two-node job {i}, node {node}: exit {r.returncode}"
                      + ("" if r.returncode == 0 else "\n" + failure(r)), flush=True)
    print(f"{a.runs} 4-rank jobs and {a.nodes_runs} two-node jobs in {time.monotonic() - t0:.0f}s: "
          f"{bad} non-zero exits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
