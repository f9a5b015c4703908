"""End-to-end training runs on real processes: torchrun via `expertmesh run`, killed and resumed."""

import math
import sys

import pytest
import torch
from helpers import expertmesh_run, failure, read_metrics, wandb_records

from expertmesh import config
from expertmesh.dist.env import DistEnv
from expertmesh.train.loop import run

pytestmark = pytest.mark.distributed


def _train_on_rank(rank, world, overrides):
    cfg = config.load(None, overrides)
    rec = run(cfg, DistEnv(rank, rank, world, world, "torchrun"))
    # Every rank must end with identical weights: gradients were averaged, updates are the same.
    from expertmesh.dist.checkpoint import latest_intact

    path = latest_intact(cfg.run_path)
    return rec, str(path)


def _train_corrupt_resume(rank, world, overrides):
    """Trains 6 steps, damages the newest checkpoint's rank-1 shard, resumes to 8; records each file hashed."""
    from expertmesh.dist import checkpoint

    hashed, sha256 = [], checkpoint._sha256
    checkpoint._sha256 = lambda path: hashed.append((sys._getframe(1).f_code.co_name, path.parent.name,
                                                     path.name)) or sha256(path)
    rec = run(config.load(None, overrides + ["train.steps=6"]), DistEnv(rank, rank, world, world, "torchrun"))
    saved, hashed[:] = list(hashed), []
    cfg = config.load(None, overrides + ["train.steps=8"])
    if rank == 0:
        shard = cfg.run_path / "step-6" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    torch.distributed.barrier()
    run(cfg, DistEnv(rank, rank, world, world, "torchrun"))
    return rec, saved, hashed


def test_data_parallel_ranks_train_one_model(run_distributed, tiny_overrides, tmp_path):
    """Two dp ranks train one model; each checkpoint file is hashed once, by its writer on save and by one
    reader on load, and a corrupted shard of the newest checkpoint sends both ranks back to the one before."""
    overrides = tiny_overrides + ["metrics.log_every=1", "checkpoint.every=3", "checkpoint.keep=3"]
    results = run_distributed(_train_corrupt_resume, 2, overrides)
    rec = results[0][0]
    assert rec["step"] == 6 and math.isfinite(rec["loss"])
    assert rec["comm_bytes_per_step"]["dense_dp"] > 0
    run_path = tmp_path / "default"
    # Each rank wrote its own shard file; DCP deduplicated the replicated weights.
    assert sorted(p.name for p in (run_path / "step-6").glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
    files = sorted(__import__("json").loads((run_path / "step-3" / "COMPLETE.json").read_text())["files"])
    assert "__1_0.distcp" in files and ".metadata" in files
    saved = [[(d, f) for _, d, f in r[1]] for r in results]
    assert sorted(saved[0] + saved[1]) == sorted((d, f) for d in ("step-3", "step-6") for f in files)  # once, ...
    assert ("step-6", "__1_0.distcp") in saved[1] and ("step-6", "__1_0.distcp") not in saved[0]  # ... by its writer
    checked = [(d, f) for r in results for caller, d, f in r[2] if caller == "verify"]
    assert sorted(f for d, f in checked if d == "step-3") == files  # the intact one: every file, by one rank
    damaged = [f for d, f in checked if d == "step-6"]
    assert "__1_0.distcp" in damaged and len(set(damaged)) == len(damaged)  # a check stops at its first mismatch
    steps = [r["step"] for r in map(__import__("json").loads, (run_path / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]  # resumed from step 3 on both ranks


def test_killed_run_resumes_with_identical_losses(tiny_overrides, tmp_path):
    common = tiny_overrides + ["train.steps=12", "metrics.log_every=1", "checkpoint.every=4", "train.eval_every=6",
                               "model.dim=64", "data.batch_size=8"]
    ref = expertmesh_run(2, common + ["train.name=ref"])
    assert ref.returncode == 0, failure(ref)

    resumed = common + ["train.name=cut", "metrics.wandb_mode=offline"]
    killed = expertmesh_run(2, resumed, env_extra={"EXPERTMESH_KILL_AT": "10:1"})
    assert killed.returncode != 0  # rank 1 died by SIGKILL after step 10, torchrun gave up
    cut = tmp_path / "cut"
    assert (cut / "step-8" / "COMPLETE.json").is_file() and not (cut / "step-12").exists()
    before = read_metrics(cut)
    assert max(before) == 10

    again = expertmesh_run(2, resumed)
    assert again.returncode == 0, failure(again)
    assert "resumed from" in again.stdout and "step-8" in again.stdout
    assert again.stdout.count("step 12/12 | loss") == 1  # only rank 0 prints

    ref_losses = {s: r["loss"] for s, r in read_metrics(tmp_path / "ref").items()}
    cut_losses = {s: r["loss"] for s, r in read_metrics(cut).items()}
    assert sorted(cut_losses) == list(range(1, 13))
    assert cut_losses == ref_losses  # bit-for-bit: same weights, optimizer, schedule, RNG, data position
    ref_eval = {s: r["eval_loss"] for s, r in read_metrics(tmp_path / "ref", "eval").items()}
    cut_eval = {s: r["eval_loss"] for s, r in read_metrics(cut, "eval").items()}
    assert ref_eval == cut_eval and sorted(ref_eval) == [0, 6, 12]

    # W&B: both attempts wrote offline runs under the same run id, holding the config and the metrics.
    run_id = (cut / "wandb_run_id").read_text().strip()
    files = sorted(cut.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    records = [r for f in files for r in wandb_records(f)]
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert {"model", "moe", "parallel", "train"} <= config_keys
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            if "loss" in items:
                logged[int(items["_step"])] = float(items["loss"])
    assert logged == pytest.approx(cut_losses)  # the killed attempt flushed its steps before exiting


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(tiny_overrides, tmp_path, caplog):
    base = tiny_overrides + ["metrics.log_every=1", "checkpoint.every=2", "checkpoint.keep=3"]
    single = DistEnv(0, 0, 1, 1, "single")
    run(config.load(None, base + ["train.steps=6"]), single)
    run_path = tmp_path / "default"
    assert sorted(p.name for p in run_path.glob("step-*")) == ["step-2", "step-4", "step-6"]

    shard = next((run_path / "step-6").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (run_path / "step-4" / "rank-0.pt").write_bytes((run_path / "step-4" / "rank-0.pt").read_bytes()[:10])
    caplog.set_level("WARNING")
    run(config.load(None, base + ["train.steps=8"]), single)
    assert "step-6" in caplog.text and "corrupted" in caplog.text
    assert "step-4" in caplog.text and "truncated" in caplog.text
    steps = [r["step"] for r in map(__import__("json").loads, (run_path / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps[-6:] == [3, 4, 5, 6, 7, 8]  # resumed from step 2, the newest intact one


def test_no_intact_checkpoint_is_a_one_line_error(tiny_overrides, tmp_path):
    base = tiny_overrides + ["checkpoint.every=2", "checkpoint.keep=1"]
    single = DistEnv(0, 0, 1, 1, "single")
    run(config.load(None, base + ["train.steps=2"]), single)
    (tmp_path / "default" / "step-2" / ".metadata").unlink()
    r = expertmesh_run(1, base + ["train.steps=4"])
    assert r.returncode != 0
    assert "expertmesh: error: no intact checkpoint" in r.stderr and "missing .metadata" in r.stderr


def test_default_model_learns(tiny_overrides, tmp_path):
    """A short single-process run on the stdlib corpus cuts the held-out loss well below its start."""
    cfg = config.load(None, tiny_overrides + ["train.steps=60", "train.eval_every=60", "optim.warmup_steps=5",
                                              "checkpoint.enabled=false"])
    torch.manual_seed(0)
    run(cfg, DistEnv(0, 0, 1, 1, "single"))
    evals = read_metrics(tmp_path / "default", "eval")
    assert evals[60]["eval_loss"] < 0.75 * evals[0]["eval_loss"]


def test_gradient_accumulation_matches_one_big_batch(tiny_overrides, tmp_path):
    """Two micro-batches of 4 draw the same windows as one batch of 8, so one step must agree."""
    single = DistEnv(0, 0, 1, 1, "single")
    base = tiny_overrides + ["train.steps=2", "metrics.log_every=1", "checkpoint.enabled=false",
                             "optim.grad_clip=0"]
    run(config.load(None, base + ["train.name=big", "data.batch_size=8"]), single)
    run(config.load(None, base + ["train.name=acc", "data.batch_size=4", "train.grad_accum=2"]), single)
    big, acc = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    assert acc[1]["loss_avg"] == pytest.approx(big[1]["loss_avg"], rel=1e-5)
    assert acc[1]["grad_norm"] == pytest.approx(big[1]["grad_norm"], rel=1e-4)
    assert acc[2]["loss_avg"] == pytest.approx(big[2]["loss_avg"], rel=1e-4)  # same update was applied


def test_router_bias_and_pr_moe_train_on_two_ranks(run_distributed, tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["train.steps=4", "metrics.log_every=2", "checkpoint.every=4",
                                  "moe.bias_update_rate=0.01", "moe.residual=true", "model.n_layers=4",
                                  "moe.num_experts_per_layer=[4, 8]"]
    results = run_distributed(_train_on_rank, 2, overrides)
    rec, _ = results[0]
    assert [len(layer) for layer in rec["expert_load"]] == [4, 8]
    assert rec["comm_bytes_per_step"]["router"] > 0
    # Same global counts on every rank -> the same bias everywhere; it is saved in the checkpoint.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "default" / "step-4"), str(tmp_path / "flat.pt"))
    state = torch.load(tmp_path / "flat.pt", weights_only=False)
    bias = state["model"]["layers.1.ffn.router.expert_bias"]
    assert bias.abs().sum() > 0 and dcp is not None
