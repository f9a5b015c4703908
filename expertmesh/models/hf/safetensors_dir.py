"""A Hugging Face checkpoint directory on disk: reading slices of its tensors, writing sharded files.

Reading opens each safetensors file lazily (`safe_open`) and reads only the requested slice of a
tensor (`get_slice`), so a rank reads only the bytes of what it holds; `bytes_read` counts them.
Writing plans shards of at most `max_shard_bytes`, writes `model-0000x-of-0000y.safetensors` and
`model.safetensors.index.json`, each through a temporary name, the index last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from expertmesh.config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsDir:
    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._open = safe_open
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise ConfigError(f"model.hf_path={str(self.path)!r} has no {SINGLE} or {INDEX}")
        self._files: dict[str, object] = {}
        if weight_map is None:
            with safe_open(self.path / SINGLE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        for name in sorted(set(weight_map.values())):
            if not (self.path / name).is_file():
                raise ConfigError(f"model.hf_path={str(self.path)!r}: shard file {name} named in {INDEX} is missing")
        self.weight_map: dict[str, str] = weight_map
        self.bytes_read = 0

    def _file(self, key: str):
        name = self.weight_map[key]
        if name not in self._files:
            self._files[name] = self._open(self.path / name, framework="pt")
        return self._files[name]

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._file(key).get_slice(key).get_dtype()]

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        part = self._file(key).get_slice(key)
        t = part[index] if index is not None else part[:]
        self.bytes_read += t.numel() * t.element_size()
        return t


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def write_sharded(items: list[tuple[str, tuple[int, ...], torch.dtype]], produce, out_dir: Path,
                  max_shard_bytes: int) -> list[Path]:
    """`items`: (key, shape, dtype) in writing order; `produce(keys)` yields (key, tensor) for one shard's keys,
    so at most one shard's tensors are in memory. Returns the files written."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size, sizes = 0, {}
    for key, shape, dtype in items:
        n = torch.Size(shape).numel() * dtype.itemsize
        sizes[key] = n
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, written = {}, []
    for name, keys in zip(names, shards, strict=True):
        tensors = {key: t.contiguous() for key, t in produce(keys)}
        tmp = out_dir / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / name)
        weight_map.update(dict.fromkeys(keys, name))
        written.append(out_dir / name)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / INDEX)
    return written
