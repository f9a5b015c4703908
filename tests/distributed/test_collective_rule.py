"""The collective rule (dist/comm_stats.py), enforced with no GPU.

Every torch.distributed collective is patched in the spawned ranks: one called from expertmesh code
other than `Comm` fails, and so does one given a tensor off the job's device (CPU under gloo; the same
check under NCCL is `Comm`'s own, tested below). Libraries' own collectives (FSDP2, DTensor, DCP, the
object collectives' internals) are let through after the device check. Then a few steps of every
feature run: EP x TP with FSDP, bias balancing, capacity dropping and checkpoints; FSSDP under data
parallelism with calibrated plans; DiLoCo with its overlapped exchange thread and 4-bit exchange; the
distill roles (one trainer, three servers); evaluation, the metrics window and the preemption flag
every step. Each feature must have sent something through `Comm`, so a run that skipped it fails too.
"""

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import make_run, tiny_overrides

import expertmesh.dist.comm_stats as comm_stats
from expertmesh import config
from expertmesh.dist.env import DistEnv
from expertmesh.launch import distill
from expertmesh.train.loop import run

pytestmark = pytest.mark.distributed

COLLECTIVES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
               "all_to_all", "broadcast", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
               "broadcast_object_list", "all_gather_object", "send_object_list", "recv_object_list", "gather",
               "scatter", "reduce", "reduce_scatter", "gather_object", "scatter_object_list", "monitored_barrier"]
TORCH_DIR = str(Path(torch.__file__).parent)
COMM_FILE = comm_stats.__file__


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dist.P2POp):
        yield x.tensor


def _guard(name, fn, calls: Counter, violations: list):
    def guarded(*args, **kwargs):
        frame = sys._getframe(1)
        caller = frame.f_code.co_filename
        if caller == COMM_FILE:
            calls["comm"] += 1
        elif caller.startswith(TORCH_DIR):
            calls["library"] += 1
        else:
            violations.append(f"torch.distributed.{name} called outside Comm at {caller}:{frame.f_lineno}")
        for t in _tensors([*args, *kwargs.values()]):
            if t.device.type != "cpu":  # the job's device under gloo
                violations.append(f"torch.distributed.{name} given a tensor on {t.device}")
        return fn(*args, **kwargs)

    return guarded


def _patch(calls, violations):
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, _guard(name, getattr(module, name), calls, violations))


FEATURES = {
    "ep2xtp2-fsdp-bias-capacity": ["parallel.ep=2", "parallel.tp=2", "moe.bias_update_rate=0.01",
                                   "moe.capacity_factor=1.0", "checkpoint.every=2"],
    "dp2xep2-fssdp-calibrate": ["parallel.ep=2", 'moe.placement="fssdp"', "moe.fssdp.calibrate=true",
                                "moe.fssdp.window=1"],
    "diloco-overlap-4bit": ["parallel.dp_replicate=2", "parallel.ep=2", "diloco.enabled=true", "diloco.sync_every=4",
                            "diloco.fragments=2", "diloco.overlap=1", "diloco.quant_bits=4"],
}


def _rank(rank, world, tmp_path, targets):
    calls, violations = Counter(), []
    _patch(calls, violations)
    env = DistEnv(rank, rank, world, world, "torchrun")
    sent = {}
    for name, overrides in FEATURES.items():
        before = calls["comm"]
        run(config.load(None, tiny_overrides(tmp_path) + [f"train.name={name}", "train.steps=4", "train.eval_every=2",
                                                         "metrics.log_every=2", "moe.every=1", *overrides]), env)
        sent[name] = calls["comm"] - before
    target, draft = targets
    before = calls["comm"]
    distill.run(config.load(None, [f"distill.target={target}", f"distill.draft={draft}", "distill.trainers=1",
                                   f'train.run_dir="{tmp_path / "distill"}"', 'distill.synthetic=["stdlib:6"]',
                                   "distill.max_new_tokens=6", "distill.prompt_len=8", "distill.update_every=2",
                                   "distill.batch_size=2", 'metrics.wandb_mode="disabled"']), env)
    sent["distill"] = calls["comm"] - before
    return violations, sent, calls["library"]


def test_every_collective_goes_through_comm_on_the_jobs_device(run_distributed, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    target, _ = make_run(tmp_path / "target", 32, 2, 0, moe_every=2)
    draft, _ = make_run(tmp_path / "draft", 16, 1, 1)
    results = run_distributed(_rank, 4, tmp_path, (target, draft), timeout=400)
    for rank, (violations, sent, library) in enumerate(results):
        assert violations == [], f"rank {rank}: " + "\n".join(sorted(set(violations)))
        assert all(n > 0 for n in sent.values()), (rank, sent)  # every feature communicated through Comm
        assert library > 0  # FSDP's and DTensor's own collectives were seen (and checked) too


def test_comm_refuses_a_tensor_off_its_groups_device(run_distributed):
    assert run_distributed(_refuse, 2) == ["ok", "ok"]


def _refuse(rank, world):
    comm = comm_stats.Comm()
    group = dist.group.WORLD
    flag = comm.tensor([rank], group, torch.int64)
    assert flag.device.type == "cpu"  # gloo: host tensors
    assert comm.all_reduce_ints([rank], group, "control") == [1]
    meta = torch.zeros(2, device="meta")
    with pytest.raises(RuntimeError, match=r"collective 'control' on a gloo group was given a tensor on meta"):
        comm.all_reduce(meta, group, "control")
    return "ok"
