"""Feature pairs under the layouts, against one process reading the same micro-batches (tests/combinations.py
says why that is the reference): the load-balance and z-losses on (their gradients under tp and sequence
parallelism), capacity dropping, bias balancing, PR-MoE, a shared expert, accumulation and recomputation,
with ep x tp, FSSDP, and DiLoCo workers. Every step's loss and gradient norm equal the reference's, and the
router biases every rank ends with equal the reference's."""

import pytest
import torch
from combinations import COMBINED, DILOCO_COMBINED
from helpers import read_metrics, tiny_overrides

import expertmesh.train.loop as train_mod
import expertmesh.train.step as step_mod
from expertmesh import config
from expertmesh.dist.env import DistEnv

pytestmark = pytest.mark.distributed

STEPS = 5


def _common(tmp_path):
    return tiny_overrides(tmp_path) + [f"train.steps={STEPS}", "metrics.log_every=1", "checkpoint.enabled=false",
                                       "moe.every=1", "optim.grad_clip=0.5", "train.threads=1", "train.eval_every=100"]


def _train(rank, world, overrides):
    """Trains; returns the router biases this rank holds at the end (every MoE layer, as lists)."""
    held = []
    update = step_mod.update_router_bias

    def keep(model, step_load, mesh, comm):
        update(model, step_load, mesh, comm)
        held[:] = [layer.router.expert_bias.tolist() for layer in step_mod.moe_layers(model)]

    step_mod.update_router_bias = keep
    train_mod.run(config.load(None, overrides), DistEnv(rank, rank, world, world, "torchrun"))
    return held


def _compare(run_distributed, tmp_path, name, world, run, ref, ref_world=1, rel=(1e-5, 1e-4)):
    common = _common(tmp_path)
    ref_biases = run_distributed(_train, ref_world, common + ref + ["train.name=ref"], timeout=300)
    got_biases = run_distributed(_train, world, common + run + [f"train.name={name}"], timeout=300)
    want, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / name)
    assert got[1]["dropped_tokens"] > 0 and got[1]["aux_loss"] > 0  # the features are at work
    if "fssdp" in name:  # hot experts replicated; owners moved, but never under DiLoCo
        assert any(sum(got[s]["fssdp"]["replicas"]) for s in got)
        assert (got[STEPS]["fssdp"]["reshards"] >= 1) != ("diloco" in name)
    for step in range(1, STEPS + 1):
        assert got[step]["dropped_tokens"] == want[step]["dropped_tokens"], step
        assert got[step]["loss_avg"] == pytest.approx(want[step]["loss_avg"], rel=rel[0]), step
        assert got[step]["aux_loss"] == pytest.approx(want[step]["aux_loss"], rel=rel[0]), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=rel[1]), step
    assert any(any(b) for b in ref_biases[0])
    per_worker = len(got_biases) // len(ref_biases)  # DiLoCo: each worker's ranks against that worker's reference
    for rank, biases in enumerate(got_biases):
        for layer, (b, r) in enumerate(zip(biases, ref_biases[rank // per_worker], strict=True)):
            torch.testing.assert_close(torch.tensor(b), torch.tensor(r), msg=lambda m, k=(rank, layer): f"{k}: {m}")


@pytest.mark.parametrize("name", list(COMBINED))
def test_combination_trains_the_micro_batched_single_process_model(run_distributed, tmp_path, name):
    world, run, ref = COMBINED[name]
    _compare(run_distributed, tmp_path, name, world, run, ref)


@pytest.mark.parametrize("name", list(DILOCO_COMBINED))
def test_diloco_workers_train_as_workers_of_replicated_ranks(run_distributed, tmp_path, name):
    world, run, ref, ref_world = DILOCO_COMBINED[name]
    _compare(run_distributed, tmp_path, name, world, run, ref, ref_world)
