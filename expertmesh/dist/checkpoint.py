"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of `runs/<name>/step-N/`:
  *.distcp, .metadata   model + optimizer + scheduler state and the shared data position, written
                        collectively by DCP as global tensors (loadable under any layout)
  rank-R.pt             per-rank state (RNG), restored only under the same layout
  COMPLETE.json         written last, by rank 0, after every rank finished: step, world size,
                        layout, and size + sha256 of every file above

Nothing in a checkpoint runs code when read (a run directory may come from someone else, e.g. as
`distill.target`): DCP's `.metadata` is unpickled with an allow-list of DCP's own metadata types,
its non-tensor items and the per-rank files are read with `torch.load(weights_only=True)`.

Each file is hashed once: by the rank that wrote it, on save (DCP names a rank's files `__<rank>_*`;
rank 0 hashes `.metadata` and anything no rank claimed), and the digests are gathered to rank 0. On
load every rank checks every file's size (a stat) and hashes its share of the files (file i on rank
i mod world); the ranks then agree on the verdict with one small all-reduce per candidate, so every
rank picks the same step (a rank that chose differently would wait forever in DCP's collectives).

A directory without an intact COMPLETE.json never counts. Resuming takes the newest directory
whose manifest matches the files on disk; a damaged newest one is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from expertmesh.dist.comm_stats import Comm

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only the types DCP writes into it are let through."""

    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        # Names only, never dotted paths: pickle resolves "os.system" under any module that imports os.
        if "." not in name and (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if "." not in name and module == dcp_metadata.__name__:  # the classes DCP defines there, nothing else
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name}: not a type DCP writes into .metadata "
                              "(the checkpoint may carry code)")


class SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` unpickled through the allow-list."""

    def read_metadata(self, *args, **kwargs):
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor items (step, data position) without pickle's code paths."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            item = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"the checkpoint item {read_item.dest_index.fqn!r} is not plain data: refused "
                                  f"({str(e).splitlines()[0]})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
        else:
            self.state_dict[read_item.dest_index.fqn] = item


def safe_load(state: dict, path: Path, **kw) -> None:
    """`dcp.load` of `path` into `state`, reading nothing that could run code."""
    SafeReader(str(path)).read_metadata()  # refused here, before DCP wraps the error or tries other files
    with warnings.catch_warnings():  # DCP warns when a single process loads without a group
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), **kw)
        except CheckpointException as e:  # DCP gathers each rank's error: ours is re-raised as itself
            ours = [err for err, _ in e.failures.values() if isinstance(err, CheckpointError)]
            if ours:
                raise ours[0] from None
            raise


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


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Returns the manifest of an intact checkpoint; raises CheckpointError naming what is wrong.
    `share` = (r, n): every file's size is checked, but only files r, r + n, ... are hashed (n = 0:
    none)."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is incomplete: no {MARKER}")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker} is unreadable: {e}") from None
    mine, n = share
    for i, (name, meta) in enumerate(sorted(files.items())):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path} is missing {name}")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{f} has {size} bytes, the manifest says {meta['size']} (truncated?)")
        if n and i % n == mine and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 in the manifest (corrupted)")
    return manifest


def _verify_together(path: Path, comm: Comm | None) -> str | None:
    """What is wrong with `path`, as every rank of the job agrees (None: intact). Alone: the whole check."""
    together = comm is not None and dist.is_initialized() and dist.get_world_size() > 1
    problem = None
    try:
        verify(path, (dist.get_rank(), dist.get_world_size()) if together else (0, 1))
        SafeReader(str(path)).read_metadata()  # a `.metadata` that would run code: an older one is used instead
    except CheckpointError as e:
        problem = f"{path}: {e}" if str(path) not in str(e) else str(e)
    if not together:
        return problem
    if not comm.all_reduce_ints([problem is not None], dist.group.WORLD, "checkpoint", op=dist.ReduceOp.MAX)[0]:
        return None
    return next(p for p in comm.all_gather_object(problem, dist.group.WORLD) if p is not None)


def latest_intact(run_path: Path, comm: Comm | None = None) -> Path | None:
    """Newest intact checkpoint; damaged newer ones (and ones whose `.metadata` the safe unpickler refuses)
    are skipped with a warning. Raises if some exist
    but none is intact, so a run never silently restarts from step 0 over its own checkpoints. With
    `comm`, every rank of the job calls it and the files are hashed once, spread over the ranks."""
    candidates = step_dirs(run_path)
    problems = []
    for _, path in candidates:
        problem = _verify_together(path, comm)
        if problem is None:
            for p in problems:
                log.warning("skipping checkpoint: %s", p)
            return path
        problems.append(problem)
    if any((p / MARKER).exists() for _, p in candidates):
        raise CheckpointError("no intact checkpoint in " + str(run_path) + ": " + "; ".join(problems)
                              + " (remove them, or set checkpoint.resume=false with a new train.name)")
    return None


def _digests(files) -> dict:
    return {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def write_marker(path: Path, step: int, layout: str, world_size: int, hashed: dict | None = None) -> None:
    """The manifest: the `hashed` digests (made by the ranks that wrote the files); this process hashes
    the rest."""
    hashed = hashed or {}
    files = {f.name: hashed.get(f.name) or _digests([f])[f.name]
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
    safe_load(state, path, no_dist=True)
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
        # Each rank hashes what it wrote; the gather means every rank's files are on disk.
        mine = _digests(f for f in path.iterdir()
                        if f.name.startswith(f"__{self.rank}_") or f.name == f"rank-{self.rank}.pt")
        world = dist.get_world_size() if dist.is_initialized() else 1
        gathered = self.comm.gather_object(mine, 0, dist.group.WORLD) if world > 1 else [mine]
        if self.rank == 0:
            write_marker(path, step, layout, world, {k: v for d in gathered for k, v in d.items()})
            self._prune()
        self.comm.barrier()
        return path

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
        manifest = verify(path, (0, 0))  # sizes only: latest_intact hashed every file once
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": -1,
                 "shared": dict(shared)}
        safe_load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(state["scheduler"])
        same = manifest.get("layout") == layout
        if not same:
            log.info("resharding %s: saved under %s, loading under %s", path, manifest.get("layout"), layout)
        per_rank = {}
        if same:
            try:
                per_rank = torch.load(path / f"rank-{self.rank}.pt", weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path / f'rank-{self.rank}.pt'} is not plain data: refused ({e})") from None
        return int(state["step"]), state["shared"], per_rank
