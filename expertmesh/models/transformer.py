"""Decoder-only transformer with MoE feed-forward layers.

RMSNorm, rotary position embeddings, causal scaled-dot-product attention, and a MoE FFN every
`moe.every` layers (dense SwiGLU otherwise). The model knows nothing about parallelism: it is
built on the meta device and `expertmesh.parallel.apply.parallelize_model` places, materializes
and initializes it from outside.

Legend: B batch, S sequence, D model dim, H heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.config import JobConfig, ModelConfig
from expertmesh.layers.mlp import SwiGLU
from expertmesh.moe.layer import MoELayer, MoEStats


def rope_frequencies(m: ModelConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary pairs and the factor cos/sin are scaled by (YaRN's attention
    factor; 1 for plain RoPE), computed as transformers computes them for the same config."""
    inv = 1.0 / m.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if m.rope_scaling == "none":
        return inv, 1.0
    f = m.rope_factor
    # YaRN: frequencies above beta_fast rotations over the original context are kept, those below
    # beta_slow are interpolated by the factor, a linear ramp blends the ones between.
    def correction_dim(rotations: float) -> float:
        turns = m.rope_original_max_seq_len / (rotations * 2 * math.pi)
        return head_dim * math.log(turns) / (2 * math.log(m.rope_theta))

    low = max(math.floor(correction_dim(m.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(m.rope_beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv = inv / f * (1 - extrapolate) + inv * extrapolate
    if m.rope_mscale and m.rope_mscale_all_dim:
        scale = yarn_mscale(f, m.rope_mscale) / yarn_mscale(f, m.rope_mscale_all_dim)
    else:
        scale = yarn_mscale(f)
    return inv, scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(m: ModelConfig, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv, scale = rope_frequencies(m, head_dim)
    angles_SH = torch.outer(torch.arange(m.max_seq_len, dtype=torch.float32), inv).to(device)
    return angles_SH.cos() * scale, angles_SH.sin() * scale


def apply_rope(x_BHSDh: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor, style: str = "interleaved"):
    """Rotates pairs of channels: (2i, 2i+1) when `interleaved`, (i, i + Dh/2) when `half` (transformers'
    rotate_half). Both rotate pair i by the same angle; the layouts differ in which channels pair up."""
    S = x_BHSDh.shape[2]
    cos, sin = cos_SH[:S], sin_SH[:S]
    if style == "half":
        x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHSDh)


def _attend(q, k, v, cache: KVCache | None, layer: int | None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of q [B, H, S, Dh] over k, v (fewer heads under GQA); with a `cache` the chunk
    attends to the cached keys/values too (decoding), and its own are appended under the layer's index.
    Callers read their index only when a cache is given: torch.compile guards on every value a block's
    code reads, and one index (or `id(self)`) read per block would make each block a graph of its own."""
    gqa = q.shape[1] != k.shape[1]
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    S = q.shape[2]
    k, v = cache.append(layer, k, v)
    if cache.tree_mask is not None:  # a tree of drafts: the cached prefix, then each node's ancestors and itself
        prefix = torch.ones(S, k.shape[2] - S, dtype=torch.bool, device=q.device)
        mask_SL = torch.cat([prefix, cache.tree_mask.to(q.device)], 1)
    else:
        mask_SL = torch.ones(S, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_SL, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional q/k/v biases and QK-norm (per head, or
    over the whole projection)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # the KV cache's key (decoding)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
        self.qk_norm, self.rope_style, self.clip = cfg.qk_norm, cfg.rope_style, cfg.clip_qkv
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, q_width, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.dim, kv_width, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.dim, kv_width, bias=cfg.attn_bias)
        self.wo = nn.Linear(q_width, cfg.dim, bias=False)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else q_width, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else kv_width, eps=cfg.norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """`cos_SH`/`sin_SH` start at this chunk's first position."""
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (t.view(B, S, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos_SH, sin_SH, self.rope_style), apply_rope(k, cos_SH, sin_SH, self.rope_style)
        o_BHSDh = _attend(q, k, v, cache, None if cache is None else self.layer)
        return self.wo(o_BHSDh.transpose(1, 2).reshape(B, S, -1))


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention: q through an optional low-rank bottleneck, keys and
    values from one compressed vector per token (kv_lora_rank) plus one rotary key shared by all heads.
    Each head's q/k is [no-position part | rotary part]; values have their own width."""

    LATENT_EPS = 1e-6  # the low-rank norms' epsilon, fixed whatever model.norm_eps (as DeepSeek-V3 builds them)

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # the KV cache's key (decoding)
        self.n_heads, self.rope_style = cfg.n_heads, cfg.rope_style
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, qk_dim = cfg.kv_lora_rank, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        bias = cfg.attn_bias  # on the down projections and the output only, as DeepSeek's attention_bias
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=bias)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=self.LATENT_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=self.LATENT_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=bias)
        mscale = yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) if cfg.rope_scaling == "yarn" else 1.0
        self.scale = qk_dim**-0.5 * mscale * mscale

    def forward(self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        if hasattr(self, "wq_a"):
            q = self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        else:
            q = self.wq(x_BSD)
        q_nope, q_rope = q.view(B, S, -1, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], -1)
        kv_c, k_rope = self.wkv_a(x_BSD).split([self.kv_rank, self.rope], -1)
        kv = self.wkv_b(self.kv_norm(kv_c)).view(B, S, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], -1)
        q_rope = apply_rope(q_rope, cos_SH, sin_SH, self.rope_style)
        k_rope = apply_rope(k_rope.reshape(B, 1, S, self.rope), cos_SH, sin_SH, self.rope_style)
        q = torch.cat([q_nope, q_rope], -1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], -1)
        o_BHSDv = _attend(q, k, v, cache, None if cache is None else self.layer, self.scale)
        return self.wo(o_BHSDv.transpose(1, 2).reshape(B, S, -1))


class KVCache:
    """Keys and values of every attention layer for a batch of sequences of one length, for decoding.
    The model advances `length` after each forward; `crop(n)` forgets everything after position n
    (speculative decoding drops the rejected drafts)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer index -> (keys, values)
        self.length = 0
        self.tree_mask: torch.Tensor | None = None  # [S, S] during a forward over a tree of drafts

    def append(self, layer: int, k_BHSDh: torch.Tensor, v_BHSDh: torch.Tensor):
        if layer in self.kv:
            k0, v0 = self.kv[layer]
            k_BHSDh, v_BHSDh = torch.cat([k0, k_BHSDh], 2), torch.cat([v0, v_BHSDh], 2)
        self.kv[layer] = (k_BHSDh, v_BHSDh)
        return k_BHSDh, v_BHSDh

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.kv = {key: (k[:, :, :length], v[:, :, :length]) for key, (k, v) in self.kv.items()}
        self.length = length

    def keep(self, index_BK: torch.Tensor) -> None:
        """Keeps, per sequence of the batch, the cached positions `index_BK` (in that order): after a tree of
        drafts, the prefix and each sequence's accepted path."""
        if index_BK.numel() and not 0 <= int(index_BK.min()) <= int(index_BK.max()) < self.length:
            raise ValueError(f"positions {index_BK.min()}..{index_BK.max()} are outside a cache of {self.length}")

        def take(t):
            return t.gather(2, index_BK[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]).to(t.device))

        self.kv = {key: (take(k), take(v)) for key, (k, v) in self.kv.items()}
        self.length = index_BK.shape[1]


class Block(nn.Module):
    def __init__(self, cfg: JobConfig, layer_id: int, num_experts: int | None = None) -> None:
        super().__init__()
        m = cfg.model
        self.attention_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.attention = (LatentAttention if m.attention == "mla" else Attention)(m, layer_id)
        self.ffn_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.is_moe = cfg.moe.is_moe(layer_id)
        self.ffn = MoELayer(m.dim, cfg.moe, num_experts) if self.is_moe else SwiGLU(m.dim, m.ffn_dim)

    def forward(self, h_BSD, cos_SH, sin_SH, cache: KVCache | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        # the cache as a keyword: tensor parallelism's input plan lays out the three positional inputs
        h_BSD = h_BSD + self.attention(self.attention_norm(h_BSD), cos_SH, sin_SH, cache=cache)
        if self.is_moe:
            out, stats = self.ffn(self.ffn_norm(h_BSD))
            return h_BSD + out, stats
        return h_BSD + self.ffn(self.ffn_norm(h_BSD)), None


class Transformer(nn.Module):
    def __init__(self, cfg: JobConfig) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = m
        self.tok_embeddings = nn.Embedding(m.vocab_size, m.dim)
        # A ModuleDict keyed by layer index keeps parameter names stable if layers are pruned or staged.
        experts = iter(cfg.moe.experts_in_layers(m.n_layers))
        self.layers = nn.ModuleDict({
            str(i): Block(cfg, i, next(experts) if cfg.moe.is_moe(i) else None) for i in range(m.n_layers)
        })
        self.norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.output = nn.Linear(m.dim, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(m, self.rotary_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        """Shares the embedding with the output head again (`to_empty` gives each module its own tensor)."""
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    @property
    def rotary_dim(self) -> int:
        m = self.cfg
        return m.qk_rope_head_dim if m.attention == "mla" else m.head_dim or m.dim // m.n_heads

    @torch.no_grad()
    def init_rope(self) -> None:
        """Fills the (non-persistent) rotary tables; they are never checkpointed or sharded."""
        cos, sin = rope_tables(self.cfg, self.rotary_dim, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initializes every parameter and buffer of an unsharded model; call after materializing from meta.
        (A sharded model draws each of its slices with `init.SeededInit`, from the same rules.)"""
        from expertmesh.models.init import init_tensor

        self.init_rope()
        for name, t in self.state_dict(keep_vars=True).items():
            init_tensor(self.cfg, name, t.data, generator)

    def make_cache(self) -> KVCache:
        """An empty KV cache for decoding (`speculative_generate` takes any model with this method)."""
        return KVCache()

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_positions(self) -> int:
        return self.cfg.max_seq_len

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None,
                tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
        """Logits for every position. With a `cache` (decoding) the tokens continue the cached ones. With a
        `tree` (decoding): (depth_S, mask_SS), the tokens are a tree after the cached prefix, token i at
        position `cache.length + depth_S[i]` attending to the prefix and to the tokens `mask_SS[i]` marks (its
        ancestors and itself); every token is cached, `KVCache.keep` keeps the accepted path."""
        h_BSD = self.tok_embeddings(tokens_BS)
        stats: list[MoEStats] = []
        start, S = (cache.length if cache is not None else 0), tokens_BS.shape[1]
        if tree is not None and cache is None:
            raise ValueError("a tree of tokens continues a cached prefix: pass a cache")
        end = start + (S if tree is None else int(tree[0].max()) + 1)
        if end > self.rope_cos.shape[0]:
            raise ValueError(f"position {end} exceeds model.max_seq_len={self.rope_cos.shape[0]}")
        if tree is None:
            cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        else:
            at = start + tree[0].to(self.rope_cos.device)
            cos, sin = self.rope_cos[at], self.rope_sin[at]
            cache.tree_mask = tree[1]
        try:
            for block in self.layers.values():
                h_BSD, s = block(h_BSD, cos, sin, cache=cache)
                if s is not None:
                    stats.append(s)
        finally:
            if cache is not None:
                cache.tree_mask = None
        if cache is not None:
            cache.length += S
        return self.output(self.norm(h_BSD)), stats


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_layer_ids(model: nn.Module) -> list[int]:
    """The model's layer index of each of `moe_layers(model)` (a pipeline stage holds some of the layers)."""
    return [int(re.search(r"(?:^|\.)layers\.(\d+)\.", name).group(1)) for name, m in model.named_modules()
            if isinstance(m, MoELayer)]


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": total, "expert": expert, "dense": total - expert}
