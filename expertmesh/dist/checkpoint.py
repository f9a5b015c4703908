"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of `runs/<name>/step-N/`:
  *.distcp, .metadata   model + optimizer + scheduler state and the shared data position, written
                        collectively by DCP as global tensors (loadable under any layout)
  rank-R.pt             per-rank state (RNG), restored only under the same layout
  COMPLETE.json         written last, by rank 0, after every rank finished: step, world size,
                        layout, and size + sha256 of every file above

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

from expertmesh.dist.comm_stats import Comm

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


def write_marker(path: Path, step: int, layout: str, world_size: int) -> None:
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.iterdir()) if f.is_file() and f.name != MARKER}
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "world_size": world_size, "layout": layout, "files": files}, indent=1))
    os.replace(tmp, path / MARKER)


def save_model(run_path: Path, step: int, model) -> Path:
    """A model-only checkpoint of an unsharded model, written by this process alone (other ranks of a
    job need not take part): `run_path/step-N/`, read back by `load_model` (no optimizer state: not for
    resuming training)."""
    path = run_path / f"step-{step}"
    shutil.rmtree(path, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model.state_dict(), "step": step}, checkpoint_id=str(path), no_dist=True)
    write_marker(path, step, "single", 1)
    return path


def load_model(path: Path, model) -> int:
    """Fills an unsharded model from any intact checkpoint (whatever layout wrote it); returns its step."""
    verify(path)
    state = {"model": model.state_dict(), "step": -1}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
    return int(state["step"])


def rng_state(device: torch.device) -> dict:
    """This rank's random state: the CPU generator's, and the GPU's when the job runs on one (dropout and
    sampling on the device draw from it)."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(per_rank: dict, device: torch.device) -> None:
    if "rng" in per_rank:
        torch.set_rng_state(per_rank["rng"])
    if "cuda_rng" in per_rank and device.type == "cuda":
        torch.cuda.set_rng_state(per_rank["cuda_rng"], device)


class Checkpointer:
    """Every sharded weight is a DTensor (tensor, expert and FSDP parallelism make them so), and DCP
    stores global tensors, so a checkpoint does not depend on the layout that wrote it: loading under
    other parallel degrees reads each rank's new slices. `shared` state (the data position) is the
    same on every rank and is saved once; `per_rank` state (RNG) only matters under the same layout."""

    def __init__(self, run_path: Path, keep: int, rank: int, comm: Comm | None = None) -> None:
        self.run_path, self.keep, self.rank = run_path, keep, rank
        self.comm = comm or Comm()

    def save(self, step: int, model, optimizer, scheduler, shared: dict, per_rank: dict, layout: str = "") -> Path:
        path = self.run_path / f"step-{step}"
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # a leftover from a crashed attempt at the same step
        self.comm.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # DCP warns when a single process saves without a group
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
                      "shared": shared}, checkpoint_id=str(path))
        tmp = path / f"rank-{self.rank}.pt.tmp"
        torch.save(per_rank, tmp)
        os.replace(tmp, path / f"rank-{self.rank}.pt")
        self.comm.barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            self._write_marker(path, step, layout)
            self._prune()
        self.comm.barrier()
        return path

    def _write_marker(self, path: Path, step: int, layout: str) -> None:
        write_marker(path, step, layout, dist.get_world_size() if dist.is_initialized() else 1)

    def _prune(self) -> None:
        intact = 0
        for _, path in step_dirs(self.run_path):
            if (path / MARKER).is_file() and intact < self.keep:
                intact += 1
            else:  # older than the last `keep` complete ones, or an abandoned partial write
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model, optimizer, scheduler, shared: dict, layout: str) -> tuple[int, dict, dict]:
        """Restores model/optimizer/scheduler in place, under this run's layout whatever the saved one;
        returns (step, shared state, this rank's state or {} when the layout changed). `shared` gives
        the keys and types to read; `layout` names this run's parallel degrees."""
        manifest = verify(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": -1,
                 "shared": dict(shared)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(state["scheduler"])
        same = manifest.get("layout") == layout
        if not same:
            log.info("resharding %s: saved under %s, loading under %s", path, manifest.get("layout"), layout)
        per_rank = torch.load(path / f"rank-{self.rank}.pt", weights_only=False) if same else {}
        return int(state["step"]), state["shared"], per_rank
