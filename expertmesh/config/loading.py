"""TOML files and dotted CLI overrides into a checked JobConfig. Precedence: CLI > file > defaults."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from expertmesh.config.checks import check
from expertmesh.config.schema import ConfigError, JobConfig, suggest


def _check_value(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, types.GenericAlias) or typ is list or origin is list:
        (inner,) = typing.get_args(typ) or (Any,)
        if isinstance(value, str):  # a single glob from the CLI
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{where}'{suggest(key, names)}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section; got {type(value).__name__} {value!r}")
            kwargs[key] = _build(typ, value, f"{where}.")
        else:
            kwargs[key] = _check_value(where, value, typ)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A CLI value is read as a TOML value (`3`, `1e-3`, `true`, `["a", "b"]`); else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override key '{dotted}' must be section.key (e.g. train.steps=50)")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return data


# What reads a checkpoint's config.json into the architecture keys: (cfg, the raw data) -> cfg
Resolver = typing.Callable[[JobConfig, dict], JobConfig]


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = (), resolve: Resolver | None = None
         ) -> JobConfig:
    """Reads the TOML file (if any), applies overrides, returns a checked JobConfig. With `model.hf_path` the
    checkpoint decides the architecture: `resolve` reads it (`expertmesh.models.hf.load_config` passes its
    own; this package reads no checkpoint)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    data = apply_overrides(data, overrides)
    cfg = _build(JobConfig, data, "")
    if cfg.model.hf_path:  # the checkpoint decides the architecture; contradicting keys are refused
        if resolve is None:
            raise ConfigError(f"model.hf_path={cfg.model.hf_path!r} is read by expertmesh.models.hf.load_config "
                              "(config.load alone reads no checkpoint)")
        cfg = resolve(cfg, data)
    check(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> JobConfig:
    cfg = _build(JobConfig, data, "")
    check(cfg)
    return cfg


def save(cfg: JobConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
