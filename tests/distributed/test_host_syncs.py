"""Host-device syncs per training step, counted on CPU so that a new one fails here before it costs a GPU.

Every `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `float()`/`int()`/`bool()` of a tensor, `.to("cpu")`, and every
op whose output size depends on the data (nonzero, bincount, boolean-mask indexing, ...) made by
expertmesh code inside `train_step` is counted (torch's own internals are not ours to count, nor the
host-side data pipeline's). A step may
sync only where a data-dependent split size needs it: expert parallelism reads the rows it receives once
per MoE layer and micro-batch; FSSDP reads its own counts (to route) and the received ones, and once per
step the load it plans from. Everything else (losses, router statistics, the gradient norm and its clip)
stays on the device until the metrics window reads it, outside the step. The Triton backend adds none (its
dispatch keeps T*K rows, the routed ones first, so no size depends on the data).
"""

import linecache
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides
from torch.overrides import TorchFunctionMode

import expertmesh
import expertmesh.train.loop as train_mod
from expertmesh import config
from expertmesh.dist.env import DistEnv

pytestmark = pytest.mark.distributed

PACKAGE = str(Path(expertmesh.__file__).parent)
DATA = str(Path(expertmesh.__file__).parent / "data")  # the host-side data pipeline: its tensors are never on a device
SYNCS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"}
SIZED_BY_DATA = {"nonzero", "argwhere", "bincount", "masked_select", "unique", "unique_consecutive"}  # on a GPU
# these wait for the device to learn their output size; so do boolean-mask indexing and repeat_interleave
# with tensor repeats and no output_size


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _to_host(args, kwargs, frame) -> bool:
    """A move to the host. On CPU every `.to(device)` targets the CPU, so only a call whose source line names
    the CPU counts (`.to("cpu")`, `.to(torch.device("cpu"))`); `.to(x.device)` is a host-to-device copy."""
    targets = [*args[1:], kwargs.get("device")]
    to_cpu = any((isinstance(a, str) and a.startswith("cpu")) or (isinstance(a, torch.device) and a.type == "cpu")
                 for a in targets)
    return to_cpu and "cpu" in linecache.getline(frame.f_code.co_filename, frame.f_lineno)


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.where = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        frame = sys._getframe(1)
        ours = frame.f_code.co_filename.startswith(PACKAGE) and not frame.f_code.co_filename.startswith(DATA)
        if ours and (name in SYNCS or name in SIZED_BY_DATA or (name == "to" and _to_host(args, kwargs, frame))
                     or (name == "__getitem__" and _bool_index(args))
                     or (name == "repeat_interleave" and "output_size" not in kwargs
                         and any(isinstance(a, torch.Tensor) for a in args[1:2]))):
            self.where[f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}"] += 1
        return func(*args, **kwargs)


LAYERS, MICRO, STEPS = 2, 2, 2  # step 2 is FSSDP's first with a load history, and every later step is as it
CASES = {  # name: (overrides, syncs allowed per step)
    "dp2xtp2-capacity-bias": (["parallel.tp=2", "moe.capacity_factor=1.0", "moe.bias_update_rate=0.01"], 0),
    "dp2xep2-capacity-bias": (["parallel.ep=2", "moe.capacity_factor=1.0", "moe.bias_update_rate=0.01"],
                              LAYERS * MICRO),
    # FSSDP: step 1 has no load history, so no replicas, and routes as expert parallelism does; then each
    # call also reads its counts to split rows over holders; one more for the load history
    "dp2xep2-fssdp": (["parallel.ep=2", 'moe.placement="fssdp"', "moe.fssdp.window=1"],
                      (LAYERS * MICRO + 1, 2 * LAYERS * MICRO + 1)),
    # the Triton kernels (interpreted here): none of their own, so the same as the C++ ops without EP and with it
    "dp2xtp2-triton": (["parallel.tp=2", 'moe.backend="triton"'], 0),
    "dp2xep2-triton": (["parallel.ep=2", 'moe.backend="triton"'], LAYERS * MICRO),
}


def _rank(rank, world, tmp_path):
    counted = []
    step = train_mod.train_step

    def counting_step(*args, **kwargs):
        with CountSyncs() as mode:
            out = step(*args, **kwargs)
        counted.append(mode.where)
        return out

    train_mod.train_step = counting_step
    results = {}
    for name, (overrides, _) in CASES.items():
        counted.clear()
        cfg = config.load(None, tiny_overrides(tmp_path) + [
            f"train.name={name}", f"train.steps={STEPS}", f"train.grad_accum={MICRO}", "moe.every=1",
            "moe.num_experts=8", "optim.grad_clip=0.5", f"metrics.log_every={STEPS}", "checkpoint.enabled=false",
            *overrides])
        train_mod.run(cfg, DistEnv(rank, rank, world, world, "torchrun"))
        results[name] = [dict(c) for c in counted]
    return results


def test_a_step_syncs_only_for_split_sizes(run_distributed, tmp_path):
    for rank, results in enumerate(run_distributed(_rank, 4, tmp_path, timeout=300)):
        for name, steps in results.items():
            allowed = CASES[name][1]
            allowed = allowed if isinstance(allowed, tuple) else (allowed,) * STEPS
            assert len(steps) == STEPS
            for i, where in enumerate(steps):
                assert sum(where.values()) == allowed[i], (rank, name, i + 1, where)
