"""Export: expertmesh weights back into a Hugging Face directory of the checkpoint's own family.

The tensors come one at a time from a DCP checkpoint (global tensors, whatever layout wrote them:
every EP/FSSDP/TP/FSDP shard is gathered by DCP, FSSDP's owners are saved in expert order) or from
an in-memory model. Each becomes the family's keys (per-expert keys for experts), written in shards
of at most `max_shard_bytes`; config.json and the tokenizer files come from the source directory.
Everything is written under OUT.partial and renamed to OUT at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from expertmesh.config import ConfigError, JobConfig
from expertmesh.models.hf.safetensors_dir import SafetensorsDir, write_sharded

log = logging.getLogger(__name__)
SOURCE_COPY = "hf_source"  # a run's copy of the checkpoint's config and tokenizer files
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def copy_source_files(src: Path, dst: Path) -> None:
    """config.json, generation and tokenizer files (not the weights): what an export needs beside them."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SOURCE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _dtype_of(hf: dict) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


def export_hf(cfg: JobConfig, shapes: dict[str, tuple[int, ...]], get, out_dir: str | Path, source_dir: str | Path,
              dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> Path:
    """`get(name)` returns expertmesh tensor `name` whole; `source_dir` holds the checkpoint's config.json
    (and its weights, if still there, whose dtypes the export keeps unless `dtype` is given)."""
    from expertmesh.models.hf import read_hf_config

    out, source = Path(out_dir), Path(source_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export directory {str(out)!r} exists and is not empty")
    hf, adapter = read_hf_config(source)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        files = SafetensorsDir(source)
    except ConfigError:
        files = None  # the source weights are gone: keep the dtype config.json names
    default = DTYPES[dtype] if dtype else _dtype_of(hf)

    owner: dict[str, tuple[str, object]] = {}  # hf key -> (expertmesh name, recipe)
    items = []
    for name, shape in shapes.items():
        recipe = adapter.recipe(name)
        if recipe is None:
            if get(name).any():
                log.warning("%s is not zero but %s has no place for it: it is not exported", name, adapter.model_type)
            continue
        for key, hf_shape in recipe.expected(shape).items():
            keep = files.dtype(key) if (files is not None and dtype is None and key in files) else default
            items.append((key, hf_shape, keep))
            owner[key] = (name, recipe)
    dtypes = {key: dt for key, _, dt in items}

    cache: dict[str, dict[str, torch.Tensor]] = {}

    def produce(keys):
        for key in keys:
            name, recipe = owner[key]
            if name not in cache:
                cache.clear()  # one expertmesh tensor at a time
                cache[name] = dict(recipe.export(get(name)))
            yield key, cache[name][key].to(dtypes[key])

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_sharded(items, produce, partial, max_shard_bytes)
    copy_source_files(source, partial)
    hf_out = json.loads((partial / "config.json").read_text())
    if dtype is not None or "quantization_config" in hf_out or hf_out.get("num_nextn_predict_layers"):
        # an fp8 source is written dequantized (bf16, or `dtype`): its quantization_config no longer holds;
        # DeepSeek-V3's multi-token-prediction layers were not imported, so none are written
        hf_out.pop("quantization_config", None)
        if hf_out.get("num_nextn_predict_layers"):
            hf_out["num_nextn_predict_layers"] = 0
        if dtype is not None:
            hf_out["dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
        (partial / "config.json").write_text(json.dumps(hf_out, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out


def dcp_reader(step_dir: Path):
    """(shapes, get) over the model tensors of a DCP checkpoint, read one tensor at a time."""
    from expertmesh.dist.checkpoint import SafeReader, safe_load

    meta = SafeReader(str(step_dir)).read_metadata().state_dict_metadata

    def get(name: str) -> torch.Tensor:
        m = meta[f"model.{name}"]
        t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        safe_load({"model": {name: t}}, step_dir, no_dist=True)
        return t

    return get


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str | None = None,
               max_shard_bytes: int = 4 << 30) -> Path:
    """`expertmesh export RUN_DIR [--step N] --hf OUT`: a run started from `model.hf_path`, exported."""
    from expertmesh import config as config_mod
    from expertmesh.dist.checkpoint import CheckpointError, latest_intact, verify
    from expertmesh.models.hf import tensor_shapes

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"{str(run)!r} is not a run directory (no config.json)")
    cfg = config_mod.from_dict(json.loads((run / "config.json").read_text()))
    if not cfg.model.hf_path:
        raise ConfigError(f"{str(run)!r} was not started from a Hugging Face checkpoint (model.hf_path is empty): "
                          "there is no family to export to")
    if step is None:
        path = latest_intact(run)
        if path is None:
            raise ConfigError(f"{str(run)!r} has no intact checkpoint")
    else:
        path = run / f"step-{step}"
        try:
            verify(path)
        except CheckpointError as e:
            raise ConfigError(f"--step {step}: {e}") from None
    # the checkpoint itself while it is there (its weights tell each tensor's dtype), else the run's copy
    source = Path(cfg.model.hf_path) if Path(cfg.model.hf_path).is_dir() else run / SOURCE_COPY
    return export_hf(cfg, tensor_shapes(cfg), dcp_reader(path), out_dir, source, dtype, max_shard_bytes)

