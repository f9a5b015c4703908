"""Every layout of expert, tensor and data parallelism trains the model one process would train.

Fixed data and seed; the global batch is 8 sequences in every layout (the single process reads all
of them), the load-balance loss is off (it is a per-rank statistic, not a mean over tokens), and
clipping is active, so the global gradient norm must include every shard. The final weights are read
back from each run's last DCP checkpoint as full tensors, which also shows that the checkpoint does
not depend on the layout that wrote it.
"""

import shutil

import pytest
import torch
from helpers import read_metrics, tiny_overrides
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from expertmesh import config
from expertmesh.launch.env import DistEnv
from expertmesh.launch.train import run
from expertmesh.parallel.plan import plan

pytestmark = pytest.mark.distributed

STEPS = 5


def _train(rank, world, overrides):
    run(config.load(None, overrides), DistEnv(rank, rank, world, world, "torchrun"))
    return rank


def _common(tiny_overrides):
    return tiny_overrides + [f"train.steps={STEPS}", "metrics.log_every=1", f"checkpoint.every={STEPS}",
                             "moe.every=1", "moe.aux_loss_coef=0.0", "optim.grad_clip=0.5", "train.threads=1"]


def _final_weights(run_path, tmp_path):
    out = tmp_path / f"{run_path.name}.pt"
    dcp_to_torch_save(str(run_path / f"step-{STEPS}"), str(out))
    return torch.load(out, weights_only=False)["model"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the whole global batch."""
    tmp = tmp_path_factory.mktemp("single")
    overrides = _common(tiny_overrides(tmp)) + ["data.batch_size=8", "train.name=single"]
    _train(0, 1, overrides)
    return read_metrics(tmp / "single"), _final_weights(tmp / "single", tmp), overrides


LAYOUTS = {
    "dp2xep2": (4, ["parallel.ep=2", "data.batch_size=2"]),
    "ep4": (4, ["parallel.ep=4", "data.batch_size=2"]),
    "ep2xtp2": (4, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=4"]),
    "dp2xtp2": (4, ["parallel.tp=2", "data.batch_size=4"]),
    "dp2xep2xtp2": (8, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=2"]),
    # the other switches: replicated gradients, no sequence/vocab parallelism, recomputation
    "ep2xtp2-ddp-nosp-ac": (4, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=4", "parallel.dp_shard=false",
                                "parallel.sequence_parallel=false", "parallel.vocab_parallel=false",
                                'parallel.activation_checkpoint="full"']),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_the_single_process_model(run_distributed, tmp_path, single, name):
    ref_metrics, ref_weights, ref_overrides = single
    world, layout = LAYOUTS[name]
    overrides = [o for o in ref_overrides if not o.startswith(("data.batch_size", "train.name", "train.run_dir"))]
    overrides += [f'train.run_dir="{tmp_path}"', f"train.name={name}", *layout]
    run_distributed(_train, world, overrides, timeout=300)
    got = read_metrics(tmp_path / name)
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(ref_metrics[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(ref_metrics[step]["grad_norm"], rel=1e-4), step
    weights = _final_weights(tmp_path / name, tmp_path)
    assert sorted(weights) == sorted(ref_weights)
    for key, ref in ref_weights.items():
        torch.testing.assert_close(weights[key], ref, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    # bytes per step as measured by the collective wrapper and tap = as predicted from shapes by `plan`
    # (ep: the prediction assumes uniform routing; the measured figure follows the real router)
    sent = got[STEPS]["comm_bytes_per_step"]
    predicted = plan(config.load(None, overrides), world).comm
    assert predicted and set(predicted) <= set(sent)
    for view, nbytes in predicted.items():
        assert sent[view] == pytest.approx(nbytes, rel=0.15 if view == "ep" else 0.02), (view, sent, predicted)


@pytest.mark.parametrize("target", ["ep4", "ep2xtp2"])
def test_checkpoint_resumes_under_another_layout(run_distributed, tmp_path, target):
    """Saved at dp2 x ep2; resumed at ep4 or tp2 x ep2 from the step-2 checkpoint, the losses of steps
    3 and 4 are the uninterrupted run's."""
    common = tiny_overrides(tmp_path) + ["train.steps=4", "metrics.log_every=1", "checkpoint.every=2",
                                         "checkpoint.keep=3", "moe.every=1", "optim.grad_clip=0.5", "train.threads=1"]
    run_distributed(_train, 4, common + ["train.name=orig", "parallel.ep=2", "data.batch_size=2"])
    orig = read_metrics(tmp_path / "orig")
    (tmp_path / target).mkdir()
    shutil.copytree(tmp_path / "orig" / "step-2", tmp_path / target / "step-2")
    world, layout = LAYOUTS[target]
    run_distributed(_train, world, common + [f"train.name={target}", *layout])
    resumed = read_metrics(tmp_path / target)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(orig[step]["loss"], rel=1e-5), step
