"""Streaming DiLoCo on real gloo workers: plain training as its special case, workers that agree
on the global weights after every sync, and a mid-cycle resume that reproduces the run."""

import shutil

import pytest
import torch
from helpers import assert_restart_reproduces, read_metrics

from expertmesh import config
from expertmesh.launch.env import DistEnv
from expertmesh.launch.train import run

pytestmark = pytest.mark.distributed


def _train(rank, world, overrides):
    run(config.load(None, overrides), DistEnv(rank, rank, world, world, "torchrun"))
    return rank


def test_one_worker_h1_plain_outer_step_is_plain_training(tiny_overrides, tmp_path):
    common = tiny_overrides + ["train.steps=6", "metrics.log_every=1", "checkpoint.enabled=false"]
    one = DistEnv(0, 0, 1, 1, "single")
    run(config.load(None, common + ["train.name=plain"]), one)
    run(config.load(None, common + ["train.name=diloco", "diloco.enabled=true", "diloco.sync_every=1",
                                     "diloco.outer_lr=1.0", "diloco.outer_momentum=0.0"]), one)
    plain, diloco = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "diloco")
    for step in range(1, 7):
        assert diloco[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-6), step
    assert diloco[6]["diloco"]["outer_steps"] == 12  # two fragments (blocks, the rest) a step


@pytest.mark.parametrize("bits, overlap", [(0, 0), (4, 1), (0, 1), (4, 0)])
def test_workers_agree_on_the_global_copy_after_every_sync(run_distributed, tiny_overrides, tmp_path, bits, overlap):
    common = tiny_overrides + ["train.steps=8", "metrics.log_every=1", "checkpoint.every=4", "checkpoint.keep=2",
                               "parallel.dp_replicate=2", "diloco.enabled=true", "diloco.sync_every=4",
                               "diloco.fragments=2", f"diloco.quant_bits={bits}", f"diloco.overlap={overlap}"]
    run_distributed(_train, 2, common)
    rec = read_metrics(tmp_path / "default")
    assert rec[8]["diloco"]["bytes_last_sync"] > 0 and rec[8]["diloco"]["outer_steps"] >= 3
    sent = [r["comm_bytes_per_step"] for r in rec.values()]
    assert sum(s.get("diloco", 0) for s in sent) > 0
    assert not any("dense_dp" in s for s in sent)  # no gradient crosses workers
    for step in (4, 8):
        w0, w1 = (torch.load(tmp_path / "default" / f"step-{step}" / f"rank-{r}.pt", weights_only=False)["diloco"]
                  for r in (0, 1))
        for a, b in zip(w0["global_copy"], w1["global_copy"], strict=True):
            assert torch.equal(a, b)
        assert any(not torch.equal(a, b) for a, b in zip(w0["local"], w1["local"], strict=True)) or overlap == 0


def test_mid_cycle_resume_reproduces_the_run(run_distributed, tiny_overrides, tmp_path):
    common = tiny_overrides + ["train.steps=8", "metrics.log_every=1", "checkpoint.every=3", "checkpoint.keep=3",
                               "parallel.dp_replicate=2", "diloco.enabled=true", "diloco.sync_every=4",
                               "diloco.fragments=2", "diloco.overlap=1", "diloco.quant_bits=4"]
    run_distributed(_train, 2, common)
    first = {s: r["loss"] for s, r in read_metrics(tmp_path / "default").items()}
    for step in (6, 8):  # as if killed after the step-3 checkpoint: mid-cycle, an exchange in flight
        shutil.rmtree(tmp_path / "default" / f"step-{step}", ignore_errors=True)
    run_distributed(_train, 2, common)
    again = {s: r["loss"] for s, r in read_metrics(tmp_path / "default").items()}
    assert again == first and sorted(again) == list(range(1, 9))


def test_a_killed_worker_restarts_the_job_from_the_last_checkpoint(tiny_overrides, tmp_path):
    """Losing a worker between syncs: torchrun restarts every worker from the last checkpoint (per-rank
    DiLoCo state included) and the run finishes with the uninterrupted run's losses."""
    common = tiny_overrides + ["train.steps=10", "metrics.log_every=1", "checkpoint.every=3",
                               "parallel.dp_replicate=2", "diloco.enabled=true", "diloco.sync_every=4",
                               "diloco.fragments=2", "diloco.overlap=1", "diloco.quant_bits=4"]
    assert_restart_reproduces(common, tmp_path)


def _train_each(rank, world, runs):
    for overrides in runs:
        _train(rank, world, overrides)
    return rank


def test_diloco_composes_with_compile_and_bf16(run_distributed, tiny_overrides, tmp_path):
    """Two workers with overlapped 4-bit exchanges: compiled blocks (traced, aot_eager) train as eager ones,
    and bf16 stays within 2% of fp32 (the global copies and outer momentum stay fp32)."""
    common = tiny_overrides + ["train.steps=6", "metrics.log_every=1", "checkpoint.enabled=false",
                               "parallel.dp_replicate=2", "diloco.enabled=true", "diloco.sync_every=2",
                               "diloco.fragments=2", "diloco.overlap=0", "diloco.quant_bits=4"]
    variants = {"eager": [], "compiled": ["train.compile=true", 'train.compile_backend="aot_eager"'],
                "bf16": ['train.mixed_precision="bf16"']}
    run_distributed(_train_each, 2, [common + [f"train.name={name}", *extra] for name, extra in variants.items()],
                    timeout=300)
    eager, compiled, bf16 = (read_metrics(tmp_path / name) for name in variants)
    assert eager[6]["diloco"]["outer_steps"] >= 5
    for step in range(1, 7):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-5), step
        assert bf16[step]["loss"] == pytest.approx(eager[step]["loss"], rel=0.02), step


def test_evaluation_does_not_change_training_under_fsdp(run_distributed, tiny_overrides, tmp_path):
    """Two workers of dp2 with FSDP inside: evaluating the global model every 2 steps (never a checkpoint step)
    leaves every training loss as it is without evaluations (FSDP's root kept the global weights gathered)."""
    common = tiny_overrides + ["train.steps=6", "metrics.log_every=1", "checkpoint.enabled=false",
                               "parallel.dp_replicate=2", "parallel.dp=2", "diloco.enabled=true",
                               "diloco.sync_every=2", "diloco.outer_lr=0.5"]
    run_distributed(_train_each, 4, [common + ["train.name=eval2", "train.eval_every=2"],
                                     common + ["train.name=eval6", "train.eval_every=6"]], timeout=300)
    often, rarely = read_metrics(tmp_path / "eval2"), read_metrics(tmp_path / "eval6")
    assert [often[s]["loss"] for s in range(1, 7)] == [rarely[s]["loss"] for s in range(1, 7)]
