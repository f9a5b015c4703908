"""`expertmesh submit` on a real (single-node) Slurm cluster: a job runs, and a job warned with SIGUSR1
checkpoints, requeues itself and resumes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import failure

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY = ["model.dim=48", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "moe.num_experts=4",
        "moe.expert_dim=32", "data.seq_len=32", "data.batch_size=8", "data.max_bytes=200000", "train.eval_batches=2"]


def _cli(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "expertmesh.launch.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    fields = dict(item.partition("=")[::2] for item in out.split())
    return fields.get("JobState", "?"), int(fields.get("Restarts", "0"))


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _submit(env, run_dir, overrides):
    r = _cli(env, "submit", "--nodes", "1", "--procs-per-node", "2", "--time", "00:10:00",
             f"train.run_dir={run_dir}", *TINY, *overrides)
    assert r.returncode == 0, failure(r)
    return r.stdout.split()[2].rstrip(";")


def _train_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_submitted_job_trains_and_checkpoints(slurm_cluster, tmp_path):
    env = dict(slurm_cluster, RDZV_PORT="0")
    job = _submit(env, tmp_path, ["train.steps=6", "metrics.log_every=2", "checkpoint.every=3",
                                  "metrics.wandb_mode=disabled"])
    _wait(lambda: _job_state(env, job)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 240, f"job {job}")
    run = tmp_path / "default"
    log = (run / f"slurm-{job}.out").read_text()
    assert _job_state(env, job)[0] == "COMPLETED", log[-3000:]
    assert _train_steps(run) == [2, 4, 6]
    assert (run / "step-6" / "COMPLETE.json").is_file()
    status = _cli(env, "status", job)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "last: step 6/6" in status.stdout


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    env = dict(slurm_cluster, RDZV_PORT="0")
    job = _submit(env, tmp_path, ["train.steps=60", "metrics.log_every=5", "checkpoint.every=100000",
                                  "metrics.wandb_mode=offline"])
    run = tmp_path / "default"
    _wait(lambda: len(_train_steps(run)) >= 3, 240, "the job to train a few steps")
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)  # what --signal=USR1@90 delivers
    # Slurm holds a requeued job back (its begin time moves ~2 minutes ahead) once the old allocation is
    # released; the begin time is reset only then, or the requeue would overwrite it.
    _wait(lambda: _job_state(env, job) == ("PENDING", 1), 120, "the job to requeue itself")
    stops = [int(p.name.split("-")[1]) for p in run.glob("step-*") if (p / "COMPLETE.json").is_file()]
    assert stops and max(stops) < 60
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True)
    _wait(lambda: _job_state(env, job)[0] in ("COMPLETED", "FAILED"), 600, "the requeued job to finish")
    log = (run / f"slurm-{job}.out").read_text()
    assert _job_state(env, job) == ("COMPLETED", 1), log[-3000:]
    assert f"stop requested (SIGUSR1): checkpointed step {max(stops)}" in log
    assert f"requeued Slurm job {job}" in log
    assert f"resumed from {run}/step-{max(stops)}" in log
    assert _train_steps(run)[-1] == 60
    run_id = (run / "wandb_run_id").read_text().strip()
    attempts = sorted(run.glob(f"wandb/offline-run-*-{run_id}"))
    assert len(attempts) == 2  # both attempts logged into the same W&B run
