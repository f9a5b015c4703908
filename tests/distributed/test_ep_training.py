"""Training with expert parallelism is the same computation as replicated data parallelism."""

import shutil

import pytest
from helpers import read_metrics

from expertmesh import config
from expertmesh.dist.env import DistEnv
from expertmesh.train.loop import run

pytestmark = pytest.mark.distributed


def _train(rank, world, overrides):
    run(config.load(None, overrides), DistEnv(rank, rank, world, world, "torchrun"))
    return rank


@pytest.mark.parametrize("world, layout", [(2, ["parallel.ep=2"])])  # dp2 x ep2 etc.: test_parallel_layouts.py
def test_ep_losses_equal_data_parallel(run_distributed, tiny_overrides, tmp_path, world, layout):
    common = tiny_overrides + ["train.steps=5", "metrics.log_every=1", "checkpoint.enabled=false", "moe.every=1",
                               "optim.grad_clip=0.5"]  # clipping active: the global norm must include all shards
    run_distributed(_train, world, common + ["train.name=dp"])
    run_distributed(_train, world, common + ["train.name=ep", *layout])
    dp, ep = read_metrics(tmp_path / "dp"), read_metrics(tmp_path / "ep")
    for step in range(1, 6):
        assert ep[step]["loss"] == pytest.approx(dp[step]["loss"], rel=1e-5), step
        assert ep[step]["grad_norm"] == pytest.approx(dp[step]["grad_norm"], rel=1e-4), step
    assert ep[5]["comm_bytes_per_step"]["ep"] > 0
    assert ep[5]["comm_bytes_per_step"]["dense_dp"] < dp[5]["comm_bytes_per_step"]["dense_dp"]  # experts left it


def test_ep_checkpoint_resume_reproduces_the_run(run_distributed, tiny_overrides, tmp_path):
    common = tiny_overrides + ["train.steps=4", "metrics.log_every=1", "checkpoint.every=2", "checkpoint.keep=3",
                               "parallel.ep=2"]
    run_distributed(_train, 2, common)
    first = {s: r["loss"] for s, r in read_metrics(tmp_path / "default").items()}
    shutil.rmtree(tmp_path / "default" / "step-4")  # as if killed after the step-2 checkpoint
    run_distributed(_train, 2, common)
    again = {s: r["loss"] for s, r in read_metrics(tmp_path / "default").items()}
    assert again == first and sorted(again) == [1, 2, 3, 4]
