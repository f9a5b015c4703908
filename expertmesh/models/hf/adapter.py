"""State-dict adapters: how one Hugging Face family's config and tensors map onto expertmesh's model.

The model class is shared; a family differs by its config mapping (`model_config`) and a few names.
Every expertmesh tensor maps to a recipe:
  Same(key)      the checkpoint's tensor as it is (Linear weights are [out, in] in both)
  Experts(...)   a stacked expert tensor [E, A, B]: expert e is the transpose of the checkpoint's
                 per-expert [B, A] weight (`...experts.{e}.gate_proj.weight`), or a part of a fused
                 3-D tensor (`...experts.gate_up_proj` [E, 2F, D], `...experts.down_proj` [E, D, F])
Recipes read any slice of the tensor they describe (a rank reads only its part) and turn a whole
tensor back into the checkpoint's keys for export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from expertmesh.config import ConfigError
from expertmesh.dist.shards import fill


@dataclass(frozen=True)
class Same:
    key: str

    def expected(self, shape, files=None) -> dict[str, tuple[int, ...]]:
        return {self.key: tuple(shape)}

    def read(self, files, shape, index, out, name) -> None:
        fill(out, files.read(self.key, index), name)

    def export(self, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(self.key, full)]


@dataclass(frozen=True)
class Experts:
    per_expert: str  # a format with {e}
    fused: str  # the fused 3-D key
    part: int  # which part of the fused tensor's second dim (gate 0, up 1; down 0)
    parts: int

    def _fused(self, files) -> bool:
        return self.per_expert.format(e=0) not in files and self.fused in files

    def expected(self, shape, files=None) -> dict[str, tuple[int, ...]]:
        E, A, B = shape
        if files is not None and self._fused(files):
            return {self.fused: (E, self.parts * B, A)}
        return {self.per_expert.format(e=e): (B, A) for e in range(E)}

    def read(self, files, shape, index, out, name) -> None:
        e_sl, a_sl, b_sl = index
        if self._fused(files):
            B = shape[2]
            rows = slice(self.part * B + b_sl.start, self.part * B + b_sl.stop)
            fill(out, files.read(self.fused, (e_sl, rows, a_sl)).permute(0, 2, 1), name)
            return
        for i, e in enumerate(range(e_sl.start, e_sl.stop)):  # straight into this rank's rows, one expert each
            fill(out[i], files.read(self.per_expert.format(e=e), (b_sl, a_sl)).t(), name)

    def export(self, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(self.per_expert.format(e=e), full[e].t()) for e in range(full.shape[0])]


ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "q_norm": "q_norm", "k_norm": "k_norm"}
LATENT = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
          "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


class Adapter:
    """The parts most families share; each family's file overrides what differs."""

    model_type = ""
    moe = "mlp"  # the MoE block's module name (Mixtral: block_sparse_moe)
    expert_names = MLP  # per-expert projection names (Mixtral: w1, w3, w2)
    shared = "shared_expert"  # the shared expert's module name (DeepSeek: shared_experts)
    router_bias = ""  # the router's selection-bias key under `moe.gate` (DeepSeek: e_score_correction_bias)
    default_theta = 10000.0

    def model_config(self, hf: dict) -> dict[str, dict]:
        """{"model": {...}, "moe": {...}}: every architecture key the checkpoint decides."""
        raise NotImplementedError

    def recipe(self, name: str) -> Same | Experts | None:
        """How expertmesh's tensor `name` is stored; None for a buffer the family does not store (zero)."""
        top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
        if name in top:
            return Same(top[name])
        m = _LAYER.match(name)
        if not m:
            raise KeyError(name)
        i, rest = m.groups()
        pre = f"model.layers.{i}."
        part, _, tail = rest.partition(".")
        if part == "attention_norm":
            return Same(pre + "input_layernorm.weight")
        if part == "ffn_norm":
            return Same(pre + "post_attention_layernorm.weight")
        if part == "attention":
            module, _, kind = tail.partition(".")
            names = LATENT if self.latent else ATTENTION
            return Same(f"{pre}self_attn.{names[module]}.{kind}")
        return self._ffn(pre, tail)

    latent = False  # multi-head latent attention (DeepSeek)

    def _ffn(self, pre: str, tail: str) -> Same | Experts | None:
        if tail.startswith("experts."):
            w = tail.split(".")[1]
            per = f"{pre}{self.moe}.experts.{{e}}.{self.expert_names[w]}.weight"
            if w == "w2":
                return Experts(per, f"{pre}mlp.experts.down_proj", 0, 1)
            return Experts(per, f"{pre}mlp.experts.gate_up_proj", 0 if w == "w1" else 1, 2)
        if tail == "router.gate.weight":
            return Same(f"{pre}{self.moe}.gate.weight")
        if tail == "router.expert_bias":
            return Same(f"{pre}{self.moe}.gate.{self.router_bias}") if self.router_bias else None
        if tail.startswith("shared."):
            w = tail.split(".")[1]
            return Same(f"{pre}mlp.{self.shared}.{MLP[w]}.weight")
        if tail == "shared_gate.weight":
            return Same(f"{pre}mlp.shared_expert_gate.weight")
        w, _, kind = tail.partition(".")
        if w in MLP:
            return Same(f"{pre}mlp.{MLP[w]}.{kind}")
        raise KeyError(tail)


# ---------------------------------------------------------------------------------------------
# Config helpers the families share


def need(hf: dict, key: str, path: str):
    if hf.get(key) is None:
        raise ConfigError(f"{path}/config.json has no {key!r} ({hf.get('model_type')})")
    return hf[key]


def rope_config(hf: dict, default_theta: float, path: str) -> dict:
    """RoPE keys from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older files)."""
    rp = dict(hf.get("rope_parameters") or {})
    if not rp:
        rp = dict(hf.get("rope_scaling") or {})
        rp.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    kind = rp.get("rope_type") or rp.get("type") or "default"
    out = {"rope_theta": float(rp.get("rope_theta", default_theta))}
    if kind == "default":
        return out | {"rope_scaling": "none"}
    if kind != "yarn":
        raise ConfigError(f"{path}/config.json: rope type {kind!r} is not supported (supported: default, yarn)")
    if rp.get("attention_factor") is not None or rp.get("truncate", True) is not True:
        raise ConfigError(f"{path}/config.json: yarn with attention_factor or truncate=false is not supported")
    factor = rp.get("factor")
    original = rp.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if factor is None:
        factor = hf["max_position_embeddings"] / original
    return out | {
        "rope_scaling": "yarn", "rope_factor": float(factor), "rope_original_max_seq_len": int(original),
        "rope_beta_fast": float(rp.get("beta_fast") or 32), "rope_beta_slow": float(rp.get("beta_slow") or 1),
        "rope_mscale": float(rp.get("mscale") or 0.0), "rope_mscale_all_dim": float(rp.get("mscale_all_dim") or 0.0),
    }


def base_model_config(hf: dict, path: str, default_theta: float) -> dict:
    """The keys every family shares: sizes, norms, embeddings, RoPE."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}/config.json: hidden_act={hf['hidden_act']!r} is not supported (silu)")
    heads = need(hf, "num_attention_heads", path)
    dim = need(hf, "hidden_size", path)
    return {
        "vocab_size": need(hf, "vocab_size", path), "dim": dim, "n_layers": need(hf, "num_hidden_layers", path),
        "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or dim // heads, "norm_eps": float(need(hf, "rms_norm_eps", path)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_seq_len": need(hf, "max_position_embeddings", path), "rope_style": "half",
        **rope_config(hf, default_theta, path),
    }


def dense_prefix(hf: dict, path: str) -> int:
    """`mlp_only_layers` (Qwen) as a count of leading dense layers; other sets are refused."""
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ConfigError(f"{path}/config.json: mlp_only_layers={dense} is supported only as the first k layers")
    return len(dense)


def no_sliding_window(hf: dict, path: str) -> None:
    window = hf.get("sliding_window")
    if (hf.get("use_sliding_window", window is not None)) and window:
        raise ConfigError(f"{path}/config.json: sliding-window attention (sliding_window={window}) is not supported")
