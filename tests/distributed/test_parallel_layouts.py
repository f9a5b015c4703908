"""Every layout of expert, tensor and data parallelism trains the model one process would train.

Fixed data and seed; the global batch is 8 sequences in every layout (the single process reads all
of them), the load-balance loss is off (it is a per-rank statistic, not a mean over tokens:
test_combinations.py turns it on against one process reading the same micro-batches), and
clipping is active, so the global gradient norm must include every shard. The final weights are read
back from each run's last DCP checkpoint as full tensors, which also shows that the checkpoint does
not depend on the layout that wrote it.
"""

import shutil

import pytest
import torch
from combinations import BF16_LAYOUTS, COMPILE_LAYOUTS, COMPILED, FEATURE_LAYOUTS, LAYOUTS, VARIANTS
from helpers import assert_compiled, read_metrics, tiny_overrides
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from expertmesh import config
from expertmesh.dist.env import DistEnv
from expertmesh.parallel.mesh import ParallelDims
from expertmesh.parallel.plan import plan
from expertmesh.train.loop import run

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


def _train_like_single(run_distributed, tmp_path, single, name, world, layout):
    """Trains `name` under `layout` and compares it with the single-process run: every step's loss and
    gradient norm, and the final weights. Returns its metrics and overrides."""
    ref_metrics, ref_weights, ref_overrides = single
    overrides = [o for o in ref_overrides if not o.startswith(("data.batch_size", "train.name", "train.run_dir"))]
    overrides += [f'train.run_dir="{tmp_path}"', f"train.name={name}", *layout]
    run_distributed(_train, world, overrides, timeout=300)
    got = read_metrics(tmp_path / name)
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(ref_metrics[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(ref_metrics[step]["grad_norm"], rel=1e-4), step
    weights = _final_weights(tmp_path / name, tmp_path)
    assert sorted(weights) == sorted(ref_weights)
    for key, ref in ref_weights.items():  # atol: the measured rounding floor of the final weights is 2.1e-6
        # (benchmarks/results/noise_floor.json: one process under other kernel levels and thread counts)
        torch.testing.assert_close(weights[key], ref, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    return got, overrides


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_the_single_process_model(run_distributed, tmp_path, single, name):
    world, layout = LAYOUTS[name]
    got, overrides = _train_like_single(run_distributed, tmp_path, single, name, world, layout)
    # bytes per step as measured by the collective wrapper and tap = as predicted from shapes by `plan`
    # (ep: the prediction assumes uniform routing; the measured figure follows the real router)
    sent = got[STEPS]["comm_bytes_per_step"]
    predicted = plan(config.load(None, overrides), world).comm
    assert predicted and set(predicted) <= set(sent)
    for view, nbytes in predicted.items():
        if view == "ep" and "fssdp" in name:  # replicas keep tokens local: fewer rows cross than under EP
            assert sent[view] < nbytes * 1.15 and sent["fssdp"] > 0
            continue
        assert sent[view] == pytest.approx(nbytes, rel=0.15 if view == "ep" else 0.02), (view, sent, predicted)


# The architecture options (combinations.VARIANTS) under the layouts that split what they add. (Per-head
# QK-norm under tp is Qwen3-MoE's case in test_hf_training.py.)


@pytest.fixture(scope="module")
def single_variant(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            tmp = tmp_path_factory.mktemp(variant)
            overrides = _common(tiny_overrides(tmp)) + VARIANTS[variant] + ["data.batch_size=8", "train.name=single"]
            _train(0, 1, overrides)
            cache[variant] = read_metrics(tmp / "single"), _final_weights(tmp / "single", tmp), overrides
        return cache[variant]

    return get


@pytest.mark.parametrize("name", list(FEATURE_LAYOUTS))
def test_architecture_options_train_the_single_process_model(run_distributed, tmp_path, single_variant, name):
    world, layout = FEATURE_LAYOUTS[name]
    _train_like_single(run_distributed, tmp_path, single_variant(name.split("-")[0]), name, world, layout)


def _resume_common(tmp_path):
    return tiny_overrides(tmp_path) + ["train.steps=4", "metrics.log_every=1", "checkpoint.every=2",
                                       "checkpoint.keep=3", "moe.every=1", "optim.grad_clip=0.5", "train.threads=1"]


@pytest.fixture(scope="module")
def dp2xep2_run(tmp_path_factory):
    """4 steps at dp2 x ep2, checkpointed at step 2 (one run for every resume below)."""
    from expertmesh.testing import spawn

    tmp = tmp_path_factory.mktemp("orig")
    spawn(_train, 4, args=(_resume_common(tmp) + ["train.name=orig", "parallel.ep=2", "data.batch_size=2"],))
    return tmp / "orig"


@pytest.mark.parametrize("target", ["ep4", "ep2xtp2", "ep4-fssdp"])
def test_checkpoint_resumes_under_another_layout(run_distributed, tmp_path, dp2xep2_run, target):
    """Saved at dp2 x ep2; resumed at ep4, tp2 x ep2 or under FSSDP from the step-2 checkpoint, the losses
    of steps 3 and 4 are the uninterrupted run's."""
    orig = read_metrics(dp2xep2_run)
    (tmp_path / target).mkdir()
    shutil.copytree(dp2xep2_run / "step-2", tmp_path / target / "step-2")
    world, layout = LAYOUTS[target]
    run_distributed(_train, world, _resume_common(tmp_path) + [f"train.name={target}", *layout])
    resumed = read_metrics(tmp_path / target)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(orig[step]["loss"], rel=1e-5), step


def test_fssdp_resumes_with_moved_owners(run_distributed, tmp_path):
    """FSSDP with owners moved every 2 steps, checkpointed at step 3 (owners not in expert order): a run
    resumed from there restores weights, optimizer state, ownership and load history, and its steps 4-6
    are the uninterrupted run's."""
    world, layout = LAYOUTS["ep4-fssdp"]
    common = tiny_overrides(tmp_path) + ["train.steps=6", "metrics.log_every=1", "checkpoint.every=3",
                                         "checkpoint.keep=3", "moe.every=1", "train.threads=1", *layout]
    run_distributed(_train, world, common + ["train.name=orig"])
    orig = read_metrics(tmp_path / "orig")
    assert orig[6]["fssdp"]["reshards"] >= 1
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "orig" / "step-3", tmp_path / "resumed" / "step-3")
    run_distributed(_train, world, common + ["train.name=resumed"])
    resumed = read_metrics(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(orig[step]["loss"], rel=1e-6), step
        assert resumed[step]["fssdp"]["replicas"] == orig[step]["fssdp"]["replicas"], step


# Mixed precision (train.mixed_precision="bf16"): bf16 weights gathered by FSDP and bf16 rows through the
# experts' all-to-all, fp32 gradient reduction and master weights. Each step's loss stays within
# BF16_REL of the same layout in fp32, and the bytes of the all-to-all and of FSDP's all-gather halve
# while the fp32 reduce-scatter does not change.
BF16_REL = 0.02


def _train_each(rank, world, runs):
    for overrides in runs:
        _train(rank, world, overrides)
    return rank


@pytest.mark.parametrize("name", list(BF16_LAYOUTS))
def test_bf16_tracks_fp32_and_halves_the_bytes(run_distributed, tmp_path, name):
    world, layout = BF16_LAYOUTS[name]
    common = _common(tiny_overrides(tmp_path)) + layout
    run_distributed(_train_each, world, [common + [f"train.name={name}-{mp}", f'train.mixed_precision="{mp}"']
                                         for mp in ("fp32", "bf16")], timeout=300)
    fp32, bf16 = (read_metrics(tmp_path / f"{name}-{mp}") for mp in ("fp32", "bf16"))
    for step in range(1, STEPS + 1):
        assert bf16[step]["loss"] == pytest.approx(fp32[step]["loss"], rel=BF16_REL), step
        assert bf16[step]["loss"] != fp32[step]["loss"]  # it did compute in bf16
    ops32, ops16 = fp32[STEPS]["comm_bytes_per_step_by_op"], bf16[STEPS]["comm_bytes_per_step_by_op"]
    # rows cross in bf16; the routing (and so the row count) may differ by a few near-ties
    assert ops16["ep.all_to_all"] == pytest.approx(ops32["ep.all_to_all"] / 2, rel=0.1)
    # FSDP gathers bf16 weights, except the routers' (units of their own that stay fp32): each router is
    # gathered twice per micro-batch (forward, backward) over dense_dp, and keeps its 4 bytes a value
    cfg = config.load(None, common)
    n = ParallelDims.from_config(cfg.parallel, world).degree("dense_dp")
    routers = sum(cfg.moe.is_moe(i) for i in range(cfg.model.n_layers)) * cfg.moe.num_experts * cfg.model.dim
    fp32_routers = routers * (n - 1) / n * 2 * 2 * cfg.train.grad_accum  # the half that did not halve
    assert ops16["dense_dp.all_gather"] == pytest.approx(ops32["dense_dp.all_gather"] / 2 + fp32_routers, rel=1e-6)
    assert ops16["dense_dp.reduce_scatter"] == pytest.approx(ops32["dense_dp.reduce_scatter"], rel=1e-6)


# Regional compilation (train.compile) under the layouts, against the eager single process: aot_eager traces
# each block's forward and backward as torch.compile does, without generating code (inductor's C++ is
# tested in tests/unit/test_compile.py; here each rank would spend a minute compiling).
@pytest.mark.parametrize("name", list(COMPILE_LAYOUTS))
def test_compiled_layout_trains_the_single_process_model(run_distributed, tmp_path, single, name):
    world, layout = COMPILE_LAYOUTS[name]
    got, _ = _train_like_single(run_distributed, tmp_path, single, f"compiled-{name}", world, [*layout, *COMPILED])
    assert_compiled(got, max_graphs=8, pieces=None)  # MoE blocks of 4 graphs (see apply.py), with and without grad
