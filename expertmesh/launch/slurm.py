"""Slurm: render the sbatch script for a config, submit it, and report on a job.

The rendered script runs one `srun` task per node; each task starts torchrun (through
`expertmesh.launch.agent`, which relays SIGUSR1 to the workers) with c10d rendezvous on the
first host of the allocation and the job id as rendezvous id, so nothing depends on node counts
written into the file. `#SBATCH --signal=USR1@90` warns the job 90 s before its limit: the run
checkpoints and requeues itself (`scontrol requeue`), and the requeued job resumes from that
checkpoint and continues the same W&B run (the run id lives in the run directory).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from expertmesh.config import ConfigError, JobConfig


@dataclass(frozen=True)
class SlurmRequest:
    nodes: int
    gpus_per_node: int = 0  # 0: a CPU job with procs_per_node processes
    procs_per_node: int = 0
    partition: str = ""
    time: str = "04:00:00"
    cpus_per_node: int = 0  # 0: let Slurm decide
    signal_seconds: int = 90

    def check(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes={self.nodes} must be >= 1")
        if (self.gpus_per_node > 0) == (self.procs_per_node > 0):
            raise ConfigError(f"give exactly one of --gpus-per-node ({self.gpus_per_node}) and --procs-per-node "
                              f"({self.procs_per_node})")

    @property
    def nproc_per_node(self) -> int:
        return self.gpus_per_node or self.procs_per_node


def render(cfg: JobConfig, req: SlurmRequest, config_path: str | None, overrides: list[str],
           python: str = "") -> str:
    req.check()
    run_dir = cfg.run_path.resolve()
    python = python or sys.executable  # the interpreter (and so the environment) that submitted the job
    sb = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={cfg.train.name}",
        f"#SBATCH --nodes={req.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={req.time}",
        f"#SBATCH --signal=USR1@{req.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        f"#SBATCH --comment=expertmesh:{run_dir}",
    ]
    if req.partition:
        sb.append(f"#SBATCH --partition={req.partition}")
    if req.gpus_per_node:
        sb.append(f"#SBATCH --gpus-per-node={req.gpus_per_node}")
    if req.cpus_per_node:
        sb.append(f"#SBATCH --cpus-per-task={req.cpus_per_node}")
    args = (["--config", str(Path(config_path).resolve())] if config_path else []) + list(overrides)
    threads = "" if req.gpus_per_node else \
        'export OMP_NUM_THREADS=$(( ${SLURM_CPUS_ON_NODE:-$(nproc)} / NPROC_PER_NODE > 0 ? ' \
        '${SLURM_CPUS_ON_NODE:-$(nproc)} / NPROC_PER_NODE : 1 ))'
    body = f"""
set -euo pipefail
cd {shlex.quote(str(Path.cwd()))}
NPROC_PER_NODE={req.nproc_per_node}
{threads}
export THP_MEM_ALLOC_ENABLE=1
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NUM_NODES node(s), rendezvous $head_node"
srun --kill-on-bad-exit=1 {shlex.quote(python)} -m expertmesh.launch.agent \\
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$NPROC_PER_NODE" \\
  --rdzv-backend=c10d --rdzv-endpoint="$head_node:${{RDZV_PORT:-29500}}" --rdzv-id="$SLURM_JOB_ID" \\
  -m expertmesh.launch.train {" ".join(shlex.quote(a) for a in args)}
"""
    return "\n".join(sb) + "\n" + body.replace("\n\n\n", "\n\n")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ConfigError(f"'{tool}' not found: is this a Slurm login node?")
    return path


def submit(script: str, run_dir: Path) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "submit.sbatch"
    path.write_text(script)
    result = subprocess.run([_need("sbatch"), "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode:
        raise ConfigError(f"sbatch failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    result = subprocess.run([_need("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True)
    if result.returncode:
        raise ConfigError(f"scontrol show job {job_id}: {result.stderr.strip()}")
    info = {}
    for item in shlex.split(result.stdout.strip()):
        key, _, value = item.partition("=")
        info[key] = value
    return info


def status(job_id: str) -> str:
    info = job_info(job_id)
    lines = [f"job {job_id}: {info.get('JobState', '?')} (restarts {info.get('Restarts', '0')}, "
             f"elapsed {info.get('RunTime', '?')}, nodes {info.get('NodeList', '?')})"]
    comment = info.get("Comment", "")
    if comment.startswith("expertmesh:"):
        run_dir = Path(comment.split(":", 1)[1])
        lines.append(f"run dir {run_dir}, log {info.get('StdOut', '?')}")
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            last = [json.loads(x) for x in metrics.read_text().splitlines() if '"kind": "train"' in x]
            if last:
                from expertmesh.metrics import format_line

                lines.append("last: " + format_line(last[-1], int(json.loads((run_dir / "config.json").read_text())
                                                                     ["train"]["steps"])))
    return "\n".join(lines)
