"""A stop request (SIGUSR1, agreed by every rank) checkpoints and requeues; with checkpoints disabled it stops
without requeueing, since a requeued job would start over."""

import logging

import pytest

import expertmesh.launch.train as train_mod
from expertmesh import config
from expertmesh.dist.checkpoint import step_dirs
from expertmesh.launch.env import DistEnv


@pytest.mark.parametrize("checkpoints", [True, False])
def test_a_stop_request_requeues_only_with_a_checkpoint(tmp_path, tiny_overrides, monkeypatch, caplog, checkpoints):
    class StopAtTwo(train_mod.Preemption):
        calls = 0

        def agreed(self, comm):
            StopAtTwo.calls += 1
            return StopAtTwo.calls == 2

    requeued = []
    monkeypatch.setattr(train_mod, "Preemption", StopAtTwo)
    monkeypatch.setattr(train_mod, "requeue_slurm_job", lambda: requeued.append(True))
    cfg = config.load(None, tiny_overrides + ["train.steps=10", "checkpoint.every=100",
                                              f"checkpoint.enabled={str(checkpoints).lower()}"])
    with caplog.at_level(logging.INFO, logger="expertmesh"):
        train_mod.run(cfg, DistEnv(0, 0, 1, 1, "single"))
    assert requeued == ([True] if checkpoints else [])
    assert [step for step, _ in step_dirs(cfg.run_path)] == ([2] if checkpoints else [])
    said = "checkpointed step 2" if checkpoints else "checkpoint.enabled=false: nothing was saved"
    assert any(said in r.message for r in caplog.records)
