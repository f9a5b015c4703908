"""Training on one GPU: NCCL at world size 1 through `Comm`, bf16 and compile, CUDA RNG in checkpoints, and the
host syncs of a step as CUDA's sync debug mode reports them (needs a GPU)."""

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from expertmesh import config
from expertmesh.dist.checkpoint import rng_state, set_rng_state
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.env import DistEnv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _overrides(tmp_path, *extra):
    return [f'train.run_dir="{tmp_path}"', "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
            "moe.num_experts=8", "moe.expert_dim=64", "moe.every=1", "data.seq_len=64", "data.batch_size=4",
            "data.max_bytes=300000", "train.eval_batches=2", "train.steps=6", "metrics.log_every=3",
            'metrics.wandb_mode="disabled"', 'train.device="cuda"', *extra]


@pytest.fixture
def nccl_world():
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from expertmesh.testing import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def test_comm_on_nccl_takes_cuda_tensors_and_refuses_host_ones(nccl_world):
    comm = Comm()
    group = dist.group.WORLD
    flag = comm.tensor([3], group, torch.int64)
    assert flag.is_cuda
    assert comm.all_reduce_ints([3, 4], group, "control") == [3, 4]
    with pytest.raises(RuntimeError, match=r"nccl group was given a tensor on cpu"):
        comm.all_reduce(torch.zeros(2), group, "control")
    comm.barrier()


def test_cuda_rng_state_is_saved_and_restored():
    device = torch.device("cuda", 0)
    torch.cuda.manual_seed(5)
    state = rng_state(device)
    assert "cuda_rng" in state
    a = torch.rand(4, device=device)
    set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), a)


@pytest.mark.parametrize("compile_", [False, True])
def test_bf16_training_on_nccl_and_its_host_syncs(nccl_world, tmp_path, compile_):
    import expertmesh.train.loop as train_mod

    step, syncs = train_mod.train_step, []

    def watched(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        return out

    train_mod.train_step = watched
    try:
        name = f"bf16-compile-{compile_}"
        rec = train_mod.run(config.load(None, _overrides(tmp_path, f"train.name={name}", 'train.mixed_precision="bf16"',
                                                         f"train.compile={str(compile_).lower()}")),
                            DistEnv(0, 0, 1, 1, "torchrun"))
    finally:
        train_mod.train_step = step
    report = os.environ.get("EXPERTMESH_REPORT_DIR")  # tests/gpu/device_check.sh collects it
    if report:
        path = Path(report) / "host_syncs_cuda.json"
        found = json.loads(path.read_text()) if path.is_file() else {}
        found[f"compile={compile_}"] = syncs
        path.write_text(json.dumps(found, indent=1))
    print(f"host syncs per step (compile={compile_}): {syncs}")
    assert math.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    # Per MoE layer: dispatch learns its output size, combine, its backward and dispatch's backward read a bounds
    # flag; per micro-batch the batch's pageable host-to-device copies (x, y).
    assert max(syncs[1:]) <= 4 * 2 + 2
