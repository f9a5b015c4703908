"""A real single-node Slurm cluster for the tests: slurm-wlm and munge from Debian, this host as the
only node (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: no cgroups needed).

Installs the packages when missing (root and apt-get required), starts munged, slurmctld and slurmd
with a config in a temporary directory, and stops every daemon it started. Where Slurm cannot be
had the tests are skipped with the reason, never passed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from expertmesh.testing import free_port

PACKAGES = ["slurm-wlm", "munge"]


def _run(cmd, timeout=600, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _ensure_installed() -> None:
    if all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        r = _run(cmd, env=env)
        if r.returncode:
            pytest.skip(f"could not install Slurm ({' '.join(cmd)}): {r.stderr.strip()[-500:]}")


def _start_munge() -> subprocess.Popen | None:
    """Returns the munged we started, or None if one was already answering."""
    if _run(["sh", "-c", "munge -n | unmunge"], timeout=10).returncode == 0:
        return None
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    for d in ("/var/log/munge", "/var/lib/munge", "/etc/munge"):
        if Path(d).exists():
            shutil.chown(d, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        shutil.chown(key, "munge", "munge")
    proc = subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "--foreground"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(50):
        if _run(["sh", "-c", "munge -n | unmunge"], timeout=10).returncode == 0:
            return proc
        time.sleep(0.2)
    proc.kill()
    pytest.skip("munged did not start")


def _write_conf(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
    for d in ("state", "spool", "log"):
        (root / d).mkdir(parents=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=expertmesh-test
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Yields the environment (SLURM_CONF set) under which sbatch/scontrol talk to the test cluster."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root")
    _ensure_installed()
    munged = _start_munge()
    root = tmp_path_factory.mktemp("slurm")
    conf = _write_conf(root)
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            daemons.append(subprocess.Popen([daemon, "-D"], env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE))
            time.sleep(1)
        for _ in range(60):
            r = _run(["sinfo", "-h", "-o", "%t"], timeout=10, env=env)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
                break
            time.sleep(0.5)
        else:
            logs = "".join((root / "log" / f).read_text()[-600:] for f in ("slurmctld.log", "slurmd.log")
                           if (root / "log" / f).exists())
            pytest.skip(f"Slurm daemons did not come up: {logs}")
        yield env
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            try:
                d.wait(timeout=15)
            except subprocess.TimeoutExpired:
                d.kill()
        if munged is not None:
            munged.terminate()
