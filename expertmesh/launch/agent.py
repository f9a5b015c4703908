"""torchrun, plus forwarding of SIGUSR1 to the workers.

Slurm warns a job before its time limit or preemption with SIGUSR1 (`#SBATCH --signal=USR1@90`).
With one torchrun per node the signal reaches the torchrun agent, whose default action for USR1
is to die, leaving the workers to be killed without a checkpoint. This wrapper runs torchrun's own
entry point in-process and relays USR1 to every descendant process instead, so each worker
finishes its step, the run checkpoints, and the job requeues itself.

    python -m expertmesh.launch.agent [torchrun arguments] -m expertmesh.launch.train --config …
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, read from /proc (workers may sit in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _relay(signum, _frame) -> None:
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv=None) -> None:
    from torch.distributed.run import main as torchrun_main

    signal.signal(signal.SIGUSR1, _relay)
    torchrun_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
