"""Hugging Face checkpoints in and out: one state-dict adapter per family (a file each, below).

    model.hf_path = DIR                      train from a checkpoint: family, sizes and weights from DIR
    expertmesh.models.hf.load_pretrained(DIR, device="cpu")   a single-process expertmesh model
    expertmesh export RUN_DIR --hf OUT       a run's weights back in the family's own files

Ranks read only the slices they hold (`HFSource` under `dist/shards.load_shards`); export writes
one shard file at a time. `HFCausalLM` (transformers' own model behind the decoding interface) is
what `expertmesh distill` uses for families expertmesh does not implement.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from expertmesh.config import ConfigError, JobConfig
from expertmesh.models.hf.adapter import Adapter
from expertmesh.models.hf.deepseek_v3 import DeepSeekV3
from expertmesh.models.hf.mixtral import Mixtral
from expertmesh.models.hf.olmoe import OLMoE
from expertmesh.models.hf.qwen2_moe import Qwen2MoE
from expertmesh.models.hf.qwen3_moe import Qwen3MoE
from expertmesh.models.hf.safetensors_dir import SafetensorsDir
from expertmesh.models.hf_lm import HFCausalLM, hf_family, is_hf_dir

FAMILIES: dict[str, Adapter] = {a.model_type: a for a in (Qwen3MoE(), Qwen2MoE(), Mixtral(), OLMoE(), DeepSeekV3())}

__all__ = ["FAMILIES", "HFCausalLM", "HFSource", "hf_family", "is_hf_dir", "load_pretrained", "read_hf_config",
           "resolve"]


def read_hf_config(path: str | Path) -> tuple[dict, Adapter]:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model.hf_path={str(path)!r} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model.hf_path={str(path)!r} has no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ConfigError(f"{cfg_file}: model_type {kind!r} is not supported "
                          f"(supported: {', '.join(sorted(FAMILIES))})")
    return hf, FAMILIES[kind]


def resolve(cfg: JobConfig, explicit: dict) -> JobConfig:
    """`cfg` with every architecture key taken from `cfg.model.hf_path`'s config.json. A key the user set
    (`explicit`: the file and CLI values before defaults) to another value is refused with both."""
    path = cfg.model.hf_path
    hf, adapter = read_hf_config(path)
    derived = adapter.model_config(hf, path)
    sections = {}
    for section, values in derived.items():
        current = getattr(cfg, section)
        given = explicit.get(section, {})
        if section == "model" and "max_seq_len" in given:  # the rotary table's length stays the user's
            values = {k: v for k, v in values.items() if k != "max_seq_len"}
        for key, value in values.items():
            if key in given and given[key] != value:
                raise ConfigError(f"{section}.{key}={given[key]!r} contradicts model.hf_path={path!r} "
                                  f"({value!r} there)")
        sections[section] = dataclasses.replace(current, **values)
    moe = sections["moe"]
    if moe.residual or moe.num_experts_per_layer:
        raise ConfigError(f"moe.residual and moe.num_experts_per_layer do not exist in {adapter.model_type} "
                          f"(model.hf_path={path!r})")
    data = cfg.data
    if "seq_len" not in explicit.get("data", {}) and data.seq_len > sections["model"].max_seq_len:
        data = dataclasses.replace(data, seq_len=sections["model"].max_seq_len)  # a default, not a request
    return dataclasses.replace(cfg, data=data, **sections)


class HFSource:
    """`read(name, shape, index, out)` for `load_shards`: this rank's slice of an expertmesh tensor, read from the
    checkpoint's files. Every key and shape is checked on construction (against `model`, or the model `cfg`
    describes), so a bad checkpoint fails as one line before anything is read."""

    def __init__(self, cfg: JobConfig, model=None) -> None:
        self.path = cfg.model.hf_path
        self.hf, self.adapter = read_hf_config(self.path)
        self.files = SafetensorsDir(self.path)
        self.check(tensor_shapes(cfg, model))

    def recipe(self, name: str):
        return self.adapter.recipe(name)

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            recipe = self.recipe(name)
            if recipe is None:
                continue
            for key, want in recipe.expected(shape, self.files).items():
                if key not in self.files:
                    raise ConfigError(f"model.hf_path={self.path!r} has no tensor {key} (for {name})")
                got = self.files.shape(key)
                if got != want:
                    raise ConfigError(f"model.hf_path={self.path!r}: {key} has shape {list(got)}, the config "
                                      f"needs {list(want)}")

    def read(self, name: str, shape, index, out: torch.Tensor) -> None:
        recipe = self.recipe(name)
        if recipe is None:  # a buffer the family does not store (the router's selection bias): zero
            out.zero_()
        else:
            recipe.read(self.files, shape, index, out, name)


def tensor_shapes(cfg: JobConfig, model=None) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor of the model `cfg` describes (`model`, or one built on meta: no memory)."""
    from expertmesh.dist.shards import model_tensors
    from expertmesh.models.transformer import Transformer

    if model is None:
        with torch.device("meta"):
            model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model_tensors(model)}


def load_config(path: str | Path | None = None, overrides=()) -> JobConfig:
    """`expertmesh.config.load` that reads `model.hf_path`'s config.json when one is given: the step that
    turns a checkpoint into the architecture keys (the launcher's way to load a config)."""
    from expertmesh import config as config_mod

    return config_mod.load(path, overrides, resolve=resolve)


def config_for(path: str | Path, overrides=()) -> JobConfig:
    return load_config(None, [f'model.hf_path="{Path(path)}"', *overrides])


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", overrides=()):
    """A single-process expertmesh model (eval mode, fp32) with the checkpoint's weights. `overrides` are
    dotted config keys that leave the architecture alone (e.g. `moe.backend="reference"`)."""
    from expertmesh.dist.shards import load_shards
    from expertmesh.models.transformer import Transformer

    cfg = config_for(path, overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    source = HFSource(cfg, model)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_rope()
    load_shards(model, source.read)
    return model.to(device).eval()


