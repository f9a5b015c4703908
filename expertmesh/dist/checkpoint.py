"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of `runs/<name>/step-N/`:
  *.distcp, .metadata   model + optimizer + scheduler state, written collectively by DCP
  rank-R.pt             per-rank state: RNG and data-loader position
  COMPLETE.json         written last, by rank 0, after every rank finished: step, world size,
                        and size + sha256 of every file above

A directory without an intact COMPLETE.json never counts. Resuming takes the newest directory
whose manifest matches the files on disk; a damaged newest one is skipped with a warning. Every
rank runs the same check on the same files, so every rank picks the same step (a rank that chose
differently would wait forever in DCP's collectives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dirs(run_path: Path) -> list[tuple[int, Path]]:
    """All step-N directories, newest first (complete or not)."""
    if not run_path.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_path.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def verify(path: Path) -> dict:
    """Returns the manifest of an intact checkpoint; raises CheckpointError naming what is wrong."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is incomplete: no {MARKER}")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker} is unreadable: {e}") from None
    for name, meta in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path} is missing {name}")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{f} has {size} bytes, the manifest says {meta['size']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 in the manifest (corrupted)")
    return manifest


def latest_intact(run_path: Path) -> Path | None:
    """Newest intact checkpoint; damaged newer ones are skipped with a warning. Raises if some exist
    but none is intact, so a run never silently restarts from step 0 over its own checkpoints."""
    candidates = step_dirs(run_path)
    problems = []
    for _, path in candidates:
        try:
            verify(path)
            for p in problems:
                log.warning("skipping checkpoint: %s", p)
            return path
        except CheckpointError as e:
            problems.append(str(e))
    if any((p / MARKER).exists() for _, p in candidates):
        raise CheckpointError("no intact checkpoint in " + str(run_path) + ": " + "; ".join(problems)
                              + " (remove them, or set checkpoint.resume=false with a new train.name)")
    return None


def _map_sharded(model_sd: dict, optim_sd: dict, sharded: dict, fn) -> tuple[dict, dict]:
    """Returns copies of the state dicts with fn(tensor, mesh) applied to every entry of a sharded
    parameter: its weights and its optimizer state tensors (Adam's scalar step is left alone). The
    inputs are never modified: get_state_dict's dicts share objects with the live optimizer."""
    model_sd = dict(model_sd)
    optim_sd = dict(optim_sd)
    state = {fqn: dict(v) for fqn, v in optim_sd.get("state", {}).items()}
    for fqn, mesh in sharded.items():
        model_sd[fqn] = fn(model_sd[fqn], mesh)
        for key, value in state.get(fqn, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[fqn][key] = fn(value, mesh)
    if "state" in optim_sd:
        optim_sd["state"] = state
    return model_sd, optim_sd


def _as_global(local: torch.Tensor, mesh) -> DTensor:
    # Expert weights are split evenly along dim 0 over `mesh`; DCP stores the global tensor, so a
    # checkpoint does not depend on how many ranks held the pieces.
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False)


def _as_local(t, _mesh) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Checkpointer:
    """`sharded` maps parameter names to the 1-D DeviceMesh their local tensors are Shard(0) on
    (expert weights under expert parallelism)."""

    def __init__(self, run_path: Path, keep: int, rank: int, sharded: dict | None = None) -> None:
        self.run_path, self.keep, self.rank = run_path, keep, rank
        self.sharded = sharded or {}

    def save(self, step: int, model, optimizer, scheduler, per_rank: dict) -> Path:
        path = self.run_path / f"step-{step}"
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # a leftover from a crashed attempt at the same step
        _barrier()
        model_sd, optim_sd = _map_sharded(*get_state_dict(model, optimizer), self.sharded, _as_global)
        with warnings.catch_warnings():  # DCP warns when a single process saves without a group
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": step},
                     checkpoint_id=str(path))
        tmp = path / f"rank-{self.rank}.pt.tmp"
        torch.save(per_rank, tmp)
        os.replace(tmp, path / f"rank-{self.rank}.pt")
        _barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            self._write_marker(path, step)
            self._prune()
        _barrier()
        return path

    def _write_marker(self, path: Path, step: int) -> None:
        files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                 for f in sorted(path.iterdir()) if f.is_file() and f.name != MARKER}
        world = dist.get_world_size() if dist.is_initialized() else 1
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"step": step, "world_size": world, "files": files}, indent=1))
        os.replace(tmp, path / MARKER)

    def _prune(self) -> None:
        intact = 0
        for _, path in step_dirs(self.run_path):
            if (path / MARKER).is_file() and intact < self.keep:
                intact += 1
            else:  # older than the last `keep` complete ones, or an abandoned partial write
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model, optimizer, scheduler) -> tuple[int, dict]:
        """Restores model/optimizer/scheduler in place; returns (step, this rank's extra state)."""
        manifest = verify(path)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if manifest["world_size"] != world:
            raise CheckpointError(f"{path} was written by {manifest['world_size']} ranks, this run has {world}; "
                                  "loading under another layout is not supported yet")
        model_sd, optim_sd = _map_sharded(*get_state_dict(model, optimizer), self.sharded, _as_global)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": -1}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(path))
        model_sd, optim_sd = _map_sharded(state["model"], state["optim"], self.sharded, _as_local)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        scheduler.load_state_dict(state["scheduler"])
        extra = torch.load(path / f"rank-{self.rank}.pt", weights_only=False)
        return int(state["step"]), extra
