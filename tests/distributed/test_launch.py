"""Launching: sbatch rendering, torchrun restarts after a SIGKILL, SIGUSR1 checkpoint-and-stop, reports."""

import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, assert_restart_reproduces, failure, read_metrics

pytestmark = pytest.mark.distributed


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "expertmesh.launch.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("nodes", [1, 4])
def test_submit_dry_run_renders_the_sbatch_script(nodes):
    r = _cli("submit", "--config", "configs/default.toml", "--nodes", str(nodes), "--gpus-per-node", "8",
             "--partition", "gpu", "--time", "01:00:00", "--dry-run", "parallel.ep=4", "train.steps=20")
    assert r.returncode == 0, failure(r)
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for expected in (f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --signal=USR1@90",
                     "#SBATCH --requeue", "NPROC_PER_NODE=8"):
        assert expected in lines, expected
    script = r.stdout
    # Nothing in the launch line depends on the node count: Slurm's variables carry it.
    assert '--nnodes="$SLURM_JOB_NUM_NODES"' in script and '--rdzv-id="$SLURM_JOB_ID"' in script
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert '--rdzv-endpoint="$head_node:${RDZV_PORT:-29500}"' in script and "-m expertmesh.launch.agent" in script
    assert script.rstrip().endswith("parallel.ep=4 train.steps=20")
    assert "OMP_NUM_THREADS" not in script  # GPU job: one thread setting per process is torch's default


def test_an_elastic_diloco_worker_submits_as_its_own_job():
    r = _cli("submit", "--nodes", "1", "--procs-per-node", "2", "--dry-run", "train.name=el", "diloco.enabled=true",
             "diloco.elastic=true", "diloco.workers=2", "diloco.worker=1", 'diloco.store="h:29600"')
    assert r.returncode == 0, failure(r)
    assert "/runs/el/worker1/slurm-%j.out" in r.stdout and "diloco.worker=1" in r.stdout
    r = _cli("diloco-store", "no-port")
    assert r.returncode == 2 and "give host:port" in r.stderr


def test_submit_refuses_inconsistent_requests():
    r = _cli("submit", "--nodes", "2", "--gpus-per-node", "4", "--procs-per-node", "2", "--dry-run")
    assert r.returncode == 2 and "exactly one of --gpus-per-node (4) and --procs-per-node (2)" in r.stderr
    r = _cli("submit", "--nodes", "3", "--procs-per-node", "1", "--dry-run", "parallel.ep=2")
    assert r.returncode == 2 and "does not divide WORLD_SIZE(3)" in r.stderr


def test_torchrun_restart_after_sigkill_finishes_with_the_same_losses(tiny_overrides, tmp_path):
    common = tiny_overrides + ["train.steps=10", "metrics.log_every=1", "checkpoint.every=3", "model.dim=64"]
    assert_restart_reproduces(common, tmp_path)


def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_sigusr1_checkpoints_and_stops_then_resumes(tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["train.steps=100000", "metrics.log_every=1", "checkpoint.every=100000",
                                  "model.dim=64", "data.batch_size=16"]
    cmd = [sys.executable, "-m", "expertmesh.launch.agent", "--standalone", "--nproc_per_node=2",
           "-m", "expertmesh.launch.train", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "default" / "metrics.jsonl"
    try:
        assert _wait_for(lambda: metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 3)
        proc.send_signal(signal.SIGUSR1)  # what Slurm sends 90 s before the time limit
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGUSR1)" in out and "not running under Slurm" in out
    stopped_at = max(read_metrics(tmp_path / "default"))
    assert (tmp_path / "default" / f"step-{stopped_at}" / "COMPLETE.json").is_file()
    assert stopped_at < 1000


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_report_writes_plots_and_summary(run_distributed, tiny_overrides, tmp_path):
    from expertmesh import config
    from expertmesh.dist.env import DistEnv
    from expertmesh.train.loop import run

    run(config.load(None, tiny_overrides + ["train.steps=8", "metrics.log_every=2", "train.eval_every=4",
                                            "checkpoint.enabled=false", "metrics.wandb_mode=offline"]),
        DistEnv(0, 0, 1, 1, "single"))
    r = _cli("report", str(tmp_path / "default"))
    assert r.returncode == 0, failure(r)
    out = tmp_path / "default" / "report"
    for name in ("loss", "throughput", "comm", "expert_load", "imbalance"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 5000, name  # a plot, not an empty canvas
        assert _png_size(png) == (800, 450), name
    summary = (out / "summary.md").read_text()
    assert "held-out loss: first" in summary and "![expert_load](expert_load.png)" in summary
    assert "expert load max/mean per layer" in summary
    # The plots also went to the run's W&B run (offline here): same id, images in its media folder.
    run_id = (tmp_path / "default" / "wandb_run_id").read_text().strip()
    images = (tmp_path / "default").glob(f"wandb/offline-run-*-{run_id}/files/media/images/report/*.png")
    assert {p.name.rsplit("_", 2)[0] for p in images} == {"loss", "throughput", "comm", "expert_load", "imbalance"}
    # each layer's imbalance and dead experts, as the record's own tokens per expert give them
    for rec in read_metrics(tmp_path / "default").values():
        for load, layer in zip(rec["expert_load"], rec["moe_layers"], strict=True):
            mean = sum(load) / len(load)
            assert layer["max_mean"] == pytest.approx(max(load) / mean)
            assert layer["cv"] == pytest.approx(float(torch.tensor(load, dtype=torch.float64).std(correction=0)) / mean)
            assert layer["dead"] == load.count(0)


def test_torchrun_script_runs_a_job(tiny_overrides, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2")
    r = subprocess.run(["bash", "launch/torchrun.sh", *tiny_overrides, "train.steps=3", "metrics.log_every=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, failure(r)
    assert sorted(read_metrics(tmp_path / "default")) == [1, 2, 3]
    assert r.stdout.count("step 3/3 | loss") == 1
