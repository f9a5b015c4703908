"""Decoder-only transformer with MoE feed-forward layers.

RMSNorm, rotary position embeddings, causal scaled-dot-product attention, and a MoE FFN every
`moe.every` layers (dense SwiGLU otherwise). The model knows nothing about parallelism: it is
built on the meta device and `expertmesh.parallel.apply.parallelize_model` places, materializes
and initializes it from outside.

Legend: B batch, S sequence, D model dim, H heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.config import JobConfig, ModelConfig
from expertmesh.models.mlp import SwiGLU
from expertmesh.moe.layer import MoELayer, MoEStats


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles_SH = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv)
    return angles_SH.cos(), angles_SH.sin()


def apply_rope(x_BHSDh: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    S = x_BHSDh.shape[2]
    x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_SH[:S], sin_SH[:S]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHSDh)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std)

    def forward(self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """`cos_SH`/`sin_SH` start at this chunk's first position; with a `cache` the chunk attends to
        the cached keys/values too (decoding), and its own are appended."""
        B, S, _ = x_BSD.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (w(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos_SH, sin_SH), apply_rope(k, cos_SH, sin_SH)
        if cache is None:
            o_BHSDh = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.append(id(self), k, v)
            mask_SL = torch.ones(S, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - S)
            o_BHSDh = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_SL)
        return self.wo(o_BHSDh.transpose(1, 2).reshape(B, S, -1))


class KVCache:
    """Keys and values of every attention layer for a batch of sequences of one length, for decoding.
    The model advances `length` after each forward; `crop(n)` forgets everything after position n
    (speculative decoding drops the rejected drafts)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def append(self, key: int, k_BHSDh: torch.Tensor, v_BHSDh: torch.Tensor):
        if key in self.kv:
            k0, v0 = self.kv[key]
            k_BHSDh, v_BHSDh = torch.cat([k0, k_BHSDh], 2), torch.cat([v0, v_BHSDh], 2)
        self.kv[key] = (k_BHSDh, v_BHSDh)
        return k_BHSDh, v_BHSDh

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.kv = {key: (k[:, :, :length], v[:, :, :length]) for key, (k, v) in self.kv.items()}
        self.length = length


class Block(nn.Module):
    def __init__(self, cfg: JobConfig, layer_id: int, num_experts: int | None = None) -> None:
        super().__init__()
        m = cfg.model
        self.attention_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.attention = Attention(m)
        self.ffn_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.is_moe = (layer_id + 1) % cfg.moe.every == 0
        self.ffn = MoELayer(m.dim, cfg.moe, num_experts) if self.is_moe else SwiGLU(m.dim, m.ffn_dim)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std, out_std)
        self.ffn.init_weights(std, out_std)

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
            str(i): Block(cfg, i, next(experts) if (i + 1) % cfg.moe.every == 0 else None) for i in range(m.n_layers)
        })
        self.norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.output = nn.Linear(m.dim, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(m.dim // m.n_heads, m.max_seq_len, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_rope(self) -> None:
        """Fills the (non-persistent) rotary tables; they are never checkpointed or sharded."""
        m = self.cfg
        cos, sin = rope_tables(m.dim // m.n_heads, m.max_seq_len, m.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initializes every parameter and buffer; call after materializing from meta."""
        m = self.cfg
        self.init_rope()
        out_std = m.init_std / math.sqrt(2 * m.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for block in self.layers.values():
            block.init_weights(m.init_std, out_std)
        self.norm.reset_parameters()
        if not m.tie_embeddings:
            nn.init.trunc_normal_(self.output.weight, std=m.dim**-0.5)

    def make_cache(self) -> KVCache:
        """An empty KV cache for decoding (`speculative_generate` takes any model with this method)."""
        return KVCache()

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_positions(self) -> int:
        return self.cfg.max_seq_len

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
        """Logits for every position. With a `cache` (decoding) the tokens continue the cached ones."""
        h_BSD = self.tok_embeddings(tokens_BS)
        stats: list[MoEStats] = []
        start, S = (cache.length if cache is not None else 0), tokens_BS.shape[1]
        if start + S > self.rope_cos.shape[0]:
            raise ValueError(f"position {start + S} exceeds model.max_seq_len={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        for block in self.layers.values():
            h_BSD, s = block(h_BSD, cos, sin, cache=cache)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.length += S
        return self.output(self.norm(h_BSD)), stats


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": total, "expert": expert, "dense": total - expert}
