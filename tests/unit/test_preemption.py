"""A stop request (SIGUSR1, agreed by every rank) checkpoints and requeues; with checkpoints disabled it stops
without requeueing, since a requeued job would start over."""

import logging

import pytest

import expertmesh.launch.train as train_entry
import expertmesh.train.loop as train_mod
from expertmesh import config
from expertmesh.dist.checkpoint import step_dirs
from expertmesh.dist.env import DistEnv


@pytest.mark.parametrize("checkpoints, steps", [(True, 10), (False, 10), (True, 2)])
def test_a_stop_request_requeues_only_with_a_checkpoint(tmp_path, tiny_overrides, monkeypatch, caplog, capsys,
                                                        checkpoints, steps):
    class StopAtTwo(train_mod.Preemption):
        calls = 0

        def agreed(self, comm):
            StopAtTwo.calls += 1
            return StopAtTwo.calls == 2

    requeued = []
    monkeypatch.setattr(train_mod, "Preemption", StopAtTwo)
    monkeypatch.setattr(train_mod, "requeue_slurm_job", lambda: requeued.append(True))
    overrides = tiny_overrides + [f"train.steps={steps}", "checkpoint.every=100",
                                  f"checkpoint.enabled={str(checkpoints).lower()}"]
    cfg = config.load(None, overrides)
    with caplog.at_level(logging.INFO, logger="expertmesh"):
        train_mod.run(cfg, DistEnv(0, 0, 1, 1, "single"))
    assert requeued == ([True] if checkpoints and steps > 2 else [])  # at the last step: complete, no requeue
    assert [step for step, _ in step_dirs(cfg.run_path)] == ([2] if checkpoints else [])
    said = ("checkpointed step 2" if steps > 2 else "at the last step 2: training is complete, not requeued") \
        if checkpoints else "checkpoint.enabled=false: nothing was saved"
    assert any(said in r.message for r in caplog.records)


def test_a_run_already_at_its_last_step_is_an_error_not_a_success(tmp_path, tiny_overrides, capsys):
    """Resuming at or past train.steps trains nothing: one line and exit 2 (Slurm sees the job fail)."""
    overrides = tiny_overrides + ["train.steps=2", "checkpoint.every=100"]
    assert train_entry.main(overrides) == 0
    capsys.readouterr()
    assert train_entry.main(overrides[:-2] + ["train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"expertmesh: error: {tmp_path / 'default'} is already at step 2 >= train.steps=1: nothing to "
                   "train; use another train.name or raise train.steps")
