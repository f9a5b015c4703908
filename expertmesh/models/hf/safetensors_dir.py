"""A Hugging Face checkpoint directory on disk: reading slices of its tensors, writing sharded files.

Reading opens each safetensors file lazily (`safe_open`) and reads only the requested slice of a
tensor (`get_slice`), so a rank reads only the bytes of what it holds; `bytes_read` counts them.
Writing plans shards of at most `max_shard_bytes`, writes `model-0000x-of-0000y.safetensors` and
`model.safetensors.index.json`, each through a temporary name, the index last.

FP8 checkpoints (DeepSeek-V3/V3.1, Kimi-K2, Qwen3 "-FP8"): config.json's `quantization_config` says
`quant_method: "fp8"` with a `weight_block_size` [bm, bn]; each such linear weight is stored as float8
(e4m3) beside `<name>_scale_inv`, one float32 factor per bm x bn block. A read of any slice of such a
weight returns it dequantized (fp8 value x its block's factor, exact in float32; `dtype` names bfloat16, what
an export writes), reading only the factor blocks the slice touches. Any other quantization method is refused by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from expertmesh.config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def fp8_block_size(path: Path) -> tuple[int, int] | None:
    """config.json's FP8 block size, None for an unquantized checkpoint; other methods are refused."""
    cfg_file = path / "config.json"
    q = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.is_file() else None
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"model.hf_path={str(path)!r}: quantization_config quant_method={method!r} "
                          f"fmt={q.get('fmt')!r} is not supported (only block-scaled fp8 e4m3, as DeepSeek-V3's)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"model.hf_path={str(path)!r}: fp8 quantization_config needs weight_block_size [rows, "
                          f"cols], got {block!r}")
    return block[0], block[1]


class SafetensorsDir:
    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._open = safe_open
        self.fp8_block = fp8_block_size(self.path)
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
        stored = self._file(key).get_slice(key).get_dtype()
        if stored in _FP8:
            return torch.bfloat16  # what a read returns: dequantized
        if stored not in _DTYPES:
            raise ConfigError(f"model.hf_path={str(self.path)!r}: {key} is stored as {stored}, not supported")
        return _DTYPES[stored]

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        part = self._file(key).get_slice(key)
        if part.get_dtype() in _FP8:
            return self._read_fp8(key, part, index)
        t = part[index] if index is not None else part[:]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def _read_fp8(self, key: str, part, index: tuple[slice, ...] | None) -> torch.Tensor:
        """A slice of a block-scaled fp8 weight, dequantized: value x the factor of its block."""
        scale_key = key + "_scale_inv"
        shape = tuple(part.get_shape())
        missing = [why for bad, why in ((self.fp8_block is None, "config.json has no fp8 quantization_config"),
                                        (scale_key not in self, f"{scale_key} is missing"),
                                        (len(shape) != 2, "only 2-d weights are block-scaled")) if bad]
        if missing:
            raise ConfigError(f"model.hf_path={str(self.path)!r}: {key} is {part.get_dtype()} {list(shape)} but "
                              + "; ".join(missing))
        bm, bn = self.fp8_block
        want = (-(-shape[0] // bm), -(-shape[1] // bn))
        if self.shape(scale_key) != want:
            raise ConfigError(f"model.hf_path={str(self.path)!r}: {scale_key} has shape {list(self.shape(scale_key))}, "
                              f"{key} {list(shape)} in blocks of {bm}x{bn} needs {list(want)}")
        idx = tuple(index or ())
        rows, cols = idx + (slice(None),) * (2 - len(idx))
        r0, r1, _ = rows.indices(shape[0])
        c0, c1, _ = cols.indices(shape[1])
        q = part[r0:r1, c0:c1]
        s = self._file(scale_key).get_slice(scale_key)[r0 // bm: -(-r1 // bm), c0 // bn: -(-c1 // bn)]
        self.bytes_read += q.numel() * q.element_size() + s.numel() * s.element_size()
        s = s.float().repeat_interleave(bm, 0).repeat_interleave(bn, 1)
        ro, co = r0 - (r0 // bm) * bm, c0 - (c0 // bn) * bn  # the slice's offset inside its first block
        return q.float() * s[ro: ro + (r1 - r0), co: co + (c1 - c0)]  # exact in fp32: 4 bits x a float32


_FP8 = ("F8_E4M3",)
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
