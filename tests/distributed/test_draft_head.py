"""A draft head trained inside the target's run (draft_head.enabled) trains, under every layout of the
compatibility matrix's draft_head row, the head one process trains on the same micro-batches; it leaves the
target's training untouched; it resumes exactly."""

import json
import shutil
from contextlib import nullcontext

import pytest
import torch
from combinations import DRAFT_HEAD_LAYOUTS
from helpers import read_metrics, tiny_overrides
from safetensors.torch import load_file

from expertmesh import config
from expertmesh.data.loader import TokenLoader, split_tokens
from expertmesh.dist.checkpoint import load_model
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.env import DistEnv
from expertmesh.distill.head import load_head
from expertmesh.models.transformer import Transformer
from expertmesh.parallel.mesh import ParallelDims
from expertmesh.train.draft import InLoopHead
from expertmesh.train.loop import run
from expertmesh.train.wiring import load_data

pytestmark = pytest.mark.distributed

STEPS = 5
HEAD = ["draft_head.enabled=true", "draft_head.ttt_steps=2", "draft_head.warmup_steps=1", "draft_head.lr=3e-3"]


def _train(rank, world, overrides):
    run(config.load(None, overrides), DistEnv(rank, rank, world, world, "torchrun"))


def _common(tmp_path, steps=STEPS):
    return tiny_overrides(tmp_path) + [f"train.steps={steps}", "metrics.log_every=1", f"checkpoint.every={steps}",
                                       "moe.every=1", "optim.grad_clip=0.5", "train.threads=1", "train.eval_every=100"]


def _head(run_path):
    return load_file(str(run_path / "draft_head" / "model.safetensors"))


@pytest.mark.parametrize("name", list(DRAFT_HEAD_LAYOUTS))
def test_draft_head_under_a_layout_is_the_single_process_head(run_distributed, tmp_path, name):
    """Every step's target loss and head losses (each unrolled step), and the final head, against one process
    reading the same micro-batches."""
    world, layout, ref, (rel, top1, atol) = DRAFT_HEAD_LAYOUTS[name]
    common = _common(tmp_path) + HEAD
    _train(0, 1, common + ["train.name=single", *ref])
    run_distributed(_train, world, common + [f"train.name={name}", *layout], timeout=300)
    want, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / name)
    for step in range(1, STEPS + 1):
        assert got[step]["loss_avg"] == pytest.approx(want[step]["loss_avg"], rel=rel), step
        head, ref_head = got[step]["draft_head"], want[step]["draft_head"]
        assert head["loss_by_step"] == pytest.approx(ref_head["loss_by_step"], rel=rel), step
        assert head["top1_by_step"] == pytest.approx(ref_head["top1_by_step"], abs=top1), step
    assert want[STEPS]["draft_head"]["loss"] < want[1]["draft_head"]["loss"]  # the head learns
    ref_head, head = _head(tmp_path / "single"), _head(tmp_path / name)
    assert sorted(head) == sorted(ref_head)
    for key, w in ref_head.items():
        torch.testing.assert_close(head[key], w, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def test_the_head_leaves_the_target_untouched_and_resumes_exactly(tmp_path):
    """The target trains bit for bit as without a head (the head's init draws from its own generator, its
    hooks only read); the run resumed from its step-3 checkpoint ends with the head and head metrics it had."""
    common = _common(tmp_path, steps=6) + ["checkpoint.every=3"]
    _train(0, 1, common + ["train.name=plain"])
    _train(0, 1, common + HEAD + ["train.name=head"])
    plain, first = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "head")
    assert [plain[s]["loss"] for s in range(1, 7)] == [first[s]["loss"] for s in range(1, 7)]
    assert "draft_head" not in plain[6]
    assert all(0 < first[s]["draft_head"]["step_share"] < 1 for s in range(1, 7))  # timed inside each step
    head = _head(tmp_path / "head")
    shutil.rmtree(tmp_path / "head" / "step-6")
    _train(0, 1, common + HEAD + ["train.name=head"])  # resumes at step 3
    again = read_metrics(tmp_path / "head")
    timing = ("step_share",)  # the head's wall time: not part of what resumes
    assert {k: v for k, v in again[6]["draft_head"].items() if k not in timing} == \
        {k: v for k, v in first[6]["draft_head"].items() if k not in timing}
    resumed = _head(tmp_path / "head")
    assert all(torch.equal(resumed[k], head[k]) for k in head)


def test_the_head_is_written_beside_a_run_without_checkpoints(tmp_path):
    _train(0, 1, _common(tmp_path, steps=2) + HEAD + ["checkpoint.enabled=false", "train.name=nockpt"])
    meta = json.loads((tmp_path / "nockpt" / "draft_head" / "draft_head.json").read_text())
    assert meta["step"] == 2 and not list((tmp_path / "nockpt").glob("step-*"))
    head, layers, _ = load_head(tmp_path / "nockpt" / "draft_head")
    assert layers == meta["layers"] and torch.equal(head.fuse.weight, _head(tmp_path / "nockpt")["fuse.weight"])


def test_a_head_every_k_steps_is_the_loop_reference_on_those_steps_batches(tmp_path):
    """`draft_head.every=2`: the run's head equals a head trained by a loop reference (the same InLoopHead,
    every step) on the batches of steps 2, 4 and 6 only, each read by the target as it was before that step
    (its step-1, 3, 5 checkpoints), on a schedule of 3 steps; the records of steps with no head step yet
    have no head entry."""
    common = _common(tmp_path, steps=6) + ["checkpoint.every=1", "checkpoint.keep=10"]
    _train(0, 1, common + HEAD + ["draft_head.every=2", "train.name=every2"])
    got = read_metrics(tmp_path / "every2")
    assert "draft_head" not in got[1] and all("draft_head" in got[s] for s in range(2, 7))

    cfg = config.load(None, common + HEAD + ["train.steps=3", "train.name=ref"])
    target = Transformer(cfg)
    target.init_weights()
    mesh = ParallelDims.from_config(cfg.parallel, 1).build_mesh("cpu")
    ref = InLoopHead(cfg, target, mesh, Comm(), torch.device("cpu"))
    _, tokens, _ = load_data(cfg, None, None)
    train_tokens, _ = split_tokens(tokens, cfg.data.eval_fraction)
    loader = TokenLoader(train_tokens, cfg.data.seq_len, cfg.data.batch_size, 0, 1, cfg.train.seed, 1)
    for step in range(1, 7):
        x, _ = loader.next_batch()
        if step % 2:
            continue
        load_model(tmp_path / "every2" / f"step-{step - 1}", target)
        ref.begin(step // 2)
        logits, _ = target(x)
        ref.add_micro(logits.detach(), nullcontext())
        ref.step()
        rec = ref.stats(1.0)
        assert got[step]["draft_head"]["loss_by_step"] == pytest.approx(rec["loss_by_step"], rel=1e-6), step
    head = _head(tmp_path / "every2")
    # the same ops in one process on both sides: agreement to fp32 rounding, not a layout's noise floor
    for key, w in ref.head.state_dict().items():
        torch.testing.assert_close(head[key], w, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
