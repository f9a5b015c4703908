"""Target and draft models for decoding and distillation, from a path in the config.

  an expertmesh run directory   config.json + step-N checkpoints (any layout wrote them: DCP stores
                                global tensors), loaded unsharded into one process; MoE targets too
  a Hugging Face directory      `save_pretrained` output (config.json with a model_type), local only; a
                                target of a family expertmesh implements (models/hf/) is loaded as ours

Both come back as a module with `forward(tokens, cache=None) -> (logits, aux)`, `make_cache()`,
`vocab_size` and `max_positions`, plus the tokenizer that goes with them (the run's byte or BPE
tokenizer; an HF directory's tokenizer.json, else bytes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from expertmesh import config as config_mod
from expertmesh.config import ConfigError
from expertmesh.data.tokenizer import BPETokenizer, ByteTokenizer
from expertmesh.dist.checkpoint import latest_intact, load_model, save_model
from expertmesh.models.hf import FAMILIES, HFCausalLM, hf_family, is_hf_dir, load_pretrained
from expertmesh.models.transformer import Transformer


def _tokenizer_for(path: Path, cfg=None):
    if cfg is not None and cfg.data.tokenizer == "bpe":
        tok = Path(cfg.data.tokenizer_path) if cfg.data.tokenizer_path else path / "tokenizer.json"
        if not tok.is_file():
            raise ConfigError(f"{path} was trained with a BPE tokenizer but {tok} does not exist")
        return BPETokenizer.load(tok)
    if cfg is None and (path / "tokenizer.json").is_file():
        return BPETokenizer.load(path / "tokenizer.json")
    return ByteTokenizer()


def load_lm(path: str | Path, device: torch.device, what: str = "model"):
    """(module in eval mode, tokenizer, kind) for an expertmesh run directory or an HF directory."""
    path = Path(path)
    if not str(path) or not path.is_dir():
        raise ConfigError(f"distill.{what}={str(path)!r} is not a directory (an expertmesh run directory or a "
                          "Hugging Face model directory)")
    if is_hf_dir(path) and what == "target" and hf_family(path) in FAMILIES:
        # a family expertmesh implements: served by our model (our MoE kernels and statistics), not transformers'
        return load_pretrained(path, device), _tokenizer_for(path), "expertmesh-hf"
    if is_hf_dir(path):
        model = HFCausalLM.load(path, torch.float32, device)
        tokenizer = _tokenizer_for(path)
        if isinstance(tokenizer, ByteTokenizer) and model.vocab_size < 256:
            raise ConfigError(f"{path} has no tokenizer.json and a vocabulary of {model.vocab_size} < 256 bytes")
        return model, tokenizer, "hf"
    if not (path / "config.json").is_file():
        raise ConfigError(f"distill.{what}={str(path)!r} has no config.json: not a run or model directory")
    cfg = config_mod.from_dict(json.loads((path / "config.json").read_text()))
    ckpt = latest_intact(path)
    if ckpt is None:
        raise ConfigError(f"distill.{what}={str(path)!r} has no intact checkpoint (step-N/COMPLETE.json)")
    model = Transformer(cfg)
    model.init_weights()  # rotary tables; every parameter is then overwritten by the checkpoint
    load_model(ckpt, model)
    return model.to(device).eval(), _tokenizer_for(path, cfg), "expertmesh"


def export_run(cfg, model, out: Path, step: int = 0) -> Path:
    """An in-memory expertmesh model as a run directory `load_lm` reads (config.json + a checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, out / "config.json")
    save_model(out, step, model)
    return out


def save_lm(model, kind: str, source: str | Path, out: Path, step: int, meta: dict | None = None) -> Path:
    """Writes a (distilled) model where `load_lm` reads it back: an HF directory via save_pretrained, or a
    run directory (the source's config.json + a model-only checkpoint), plus `meta` as distill.json.
    Atomic: a temp dir renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "hf":
        model.hf.save_pretrained(str(tmp))
        if (Path(source) / "tokenizer.json").is_file():
            shutil.copy(Path(source) / "tokenizer.json", tmp / "tokenizer.json")
    else:
        tmp.mkdir()
        for name in ("config.json", "tokenizer.json"):
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, tmp / name)
        save_model(tmp, step, model)
    if meta is not None:
        (tmp / "distill.json").write_text(json.dumps(meta) + "\n")
    return publish_dir(tmp, out)


def publish_dir(tmp: Path, out: Path) -> Path:
    """Puts the finished directory `tmp` at `out`: the old one is moved aside first and removed after, so a
    crash at any point leaves `out` whole (old or new) or absent with `out.old` whole."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
