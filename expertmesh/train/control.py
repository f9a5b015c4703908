"""What can stop or end a rank between steps: SIGUSR1 (agreed by every rank), the Slurm requeue, and the
test hook that kills a rank."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import torch.distributed as dist

from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.env import DistEnv

log = logging.getLogger("expertmesh")


class Preemption:
    """Set by SIGUSR1 (Slurm's warning before a time limit or preemption). Ranks receive the signal
    at different moments, so at the end of every step they agree through one tiny all-reduce:
    either every rank checkpoints and stops after this step, or none does. The flag is a host value
    and travels over the gloo control group (see dist/env.py): no device sync."""

    def __init__(self, group) -> None:
        self.requested = False
        self.group = group
        signal.signal(signal.SIGUSR1, self._set)

    def _set(self, _signum, _frame) -> None:
        self.requested = True

    def agreed(self, comm: Comm) -> bool:
        flag = [1 if self.requested else 0]
        if self.group is not None:
            flag = comm.all_reduce_ints(flag, self.group, "control", op=dist.ReduceOp.MAX)
        return bool(flag[0])


def requeue_slurm_job() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("not running under Slurm: stopping without requeue")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
    else:
        log.info("requeued Slurm job %s", job)


def maybe_inject_fault(step: int, env: DistEnv) -> None:
    """Test hook: EXPERTMESH_KILL_AT="step:rank" SIGKILLs that rank after that step, on the first
    attempt only (torchrun restarts count up in TORCHELASTIC_RESTART_COUNT)."""
    spec = os.environ.get("EXPERTMESH_KILL_AT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kill_step, kill_rank = (int(v) for v in spec.split(":"))
    if step == kill_step and env.rank == kill_rank:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_hold(step: int, timeout_s: float = 600.0) -> None:
    """Test hook: EXPERTMESH_HOLD_AT="step:path[,step:path...]" stops every rank of the job after that step
    until the file `path` exists. A test creates it when the event it waits for has happened (a restarted
    worker asking to rejoin, a cut link noticed), so what it checks does not depend on how fast the machine
    trains; the timeout bounds a hang."""
    spec = os.environ.get("EXPERTMESH_HOLD_AT")
    if not spec:
        return
    for hold in spec.split(","):
        hold_step, path = hold.split(":", 1)
        if step != int(hold_step):
            continue
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"EXPERTMESH_HOLD_AT: {path} did not appear within {timeout_s:.0f}s after step "
                                   f"{step}")
            time.sleep(0.05)
