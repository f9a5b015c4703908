"""EAGLE-style draft heads: a small decoder over the target's own features that drafts with the target's LM head.

The head reads the residual stream after three of the target's blocks (low, middle, high), fuses them into
one feature per position, combines it with the embedding of the next token, runs it through its own decoder
layer(s) and predicts with the target's (frozen, shared) LM head. At position t it has the target's
feature of t and the token t+1, and predicts token t+2: the target's distribution at t+1.

Training-time test (EAGLE-3): drafting past the first token, the head's input feature is its own output of
the previous position, not the target's. Training unrolls that: step j at position p reads the head's step
j-1 output at p-1 and attends to the target-fed keys of positions <= p-j and to its own chain, step i's
key at p-j+i for 1 <= i <= j (`ttt_mask`). Each step's target is the target's distribution at p+1, so one
forward of the target trains every step. What step j computes at p is what drafting j+1 tokens ahead of
position p-j computes (tests/unit/test_draft_head.py checks it against a plain causal run of the chain).

Legend: B batch, S positions, D model dim, V vocabulary, K keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.config import DraftHeadConfig, ModelConfig
from expertmesh.distill.losses import divergence
from expertmesh.layers.mlp import SwiGLU
from expertmesh.models.transformer import apply_rope, rope_tables


def ttt_mask(S: int, step: int, device=None) -> torch.Tensor:
    """[S, (step + 1) S] boolean: which keys step `step`'s query at position p attends to, the keys of steps
    0..step laid side by side (step 0: the target-fed keys, causal up to p - step; step i >= 1: only p-step+i)."""
    p = torch.arange(S, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    return torch.cat([s <= p - step, *[s == p - step + i for i in range(1, step + 1)]], dim=1)


class HeadLayer(nn.Module):
    """A pre-norm decoder layer (grouped-query attention with RoPE, SwiGLU) whose attention takes the keys
    of earlier passes (`past`, appended to) and an explicit mask."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = m.n_heads, m.n_kv_heads or m.n_heads
        self.head_dim = m.dim // m.n_heads
        self.attention_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.wq = nn.Linear(m.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(m.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(m.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, m.dim, bias=False)
        self.ffn_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.ffn = SwiGLU(m.dim, m.ffn_dim)
        self.rope_style = m.rope_style

    def forward(self, x_BSD: torch.Tensor, cos_SH, sin_SH, past: list, mask_SK: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        h = self.attention_norm(x_BSD)
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (self.wq(h), self.wk(h), self.wv(h)))
        q, k = apply_rope(q, cos_SH, sin_SH, self.rope_style), apply_rope(k, cos_SH, sin_SH, self.rope_style)
        past.append((k, v))
        keys, values = torch.cat([pk for pk, _ in past], 2), torch.cat([pv for _, pv in past], 2)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_SK, enable_gqa=self.n_kv != self.n_heads)
        x_BSD = x_BSD + self.wo(o.transpose(1, 2).reshape(B, S, -1))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class DraftHead(nn.Module):
    """The head's own weights; the target's embedding and LM head are handed in, never owned."""

    def __init__(self, m: ModelConfig, h: DraftHeadConfig) -> None:
        super().__init__()
        D = m.dim
        self.fuse = nn.Linear(3 * D, D, bias=False)  # low, middle, high features -> one
        self.norm_emb = nn.RMSNorm(D, eps=m.norm_eps)
        self.norm_feat = nn.RMSNorm(D, eps=m.norm_eps)
        self.fc_in = nn.Linear(2 * D, D, bias=False)  # [next token's embedding | feature] -> the layer's input
        self.layers = nn.ModuleList(HeadLayer(m) for _ in range(h.decoder_layers))
        self.norm = nn.RMSNorm(D, eps=m.norm_eps)
        cos, sin = rope_tables(m, D // m.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def inputs(self, feature_BSD: torch.Tensor, emb_BSD: torch.Tensor) -> torch.Tensor:
        return self.fc_in(torch.cat([self.norm_emb(emb_BSD), self.norm_feat(feature_BSD)], -1))

    def logits(self, out_BSD: torch.Tensor, lm_head_VD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(out_BSD), lm_head_VD)

    def unrolled(self, feats: list[torch.Tensor], emb_next_BSD: torch.Tensor, lm_head_VD: torch.Tensor,
                 steps: int) -> list[torch.Tensor]:
        """Training-time test: logits [B, S, V] of steps 0..steps-1. `feats`: the target's three features at
        positions 0..S-1; `emb_next_BSD`: the embedding of the token after each position."""
        S = emb_next_BSD.shape[1]
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        feature = self.fuse(torch.cat([f.to(self.fuse.weight.dtype) for f in feats], -1))
        emb = emb_next_BSD.to(self.fuse.weight.dtype)
        past: list[list] = [[] for _ in self.layers]
        out = []
        for j in range(steps):
            mask = ttt_mask(S, j, emb.device)
            x = self.inputs(feature, emb)
            for layer, kv in zip(self.layers, past, strict=True):
                x = layer(x, cos, sin, kv, mask)
            out.append(self.logits(x, lm_head_VD))
            feature = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # position p reads p-1's output
        return out


def ttt_loss(head: DraftHead, feats: list[torch.Tensor], emb_BSD: torch.Tensor, target_logits_BSV: torch.Tensor,
             lm_head_VD: torch.Tensor, h: DraftHeadConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's loss over one forward of the target: `feats` and `emb_BSD` (the target's embedding output)
    at positions 0..S-1, the target's logits at the same positions. Step j is trained at positions
    j..S-2 against the target's distribution one position on. Returns the loss (the steps weighed by
    `step_decay ** j`) and, per step, the mean divergence and the top-1 agreement with the target (detached)."""
    target = target_logits_BSV[:, 1:].detach().float()
    p = target.softmax(-1)
    top = target.argmax(-1)
    steps = head.unrolled([f[:, :-1] for f in feats], emb_BSD[:, 1:], lm_head_VD, h.ttt_steps)
    losses, agree = [], []
    for j, logits in enumerate(steps):
        per = divergence(h.divergence, logits[:, j:].flatten(0, 1), p[:, j:].flatten(0, 1), reduction="none")
        losses.append(per.mean())
        agree.append((logits[:, j:].argmax(-1) == top[:, j:]).float().mean())
    weights = [h.step_decay**j for j in range(len(losses))]
    loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
    return loss, torch.stack(losses).detach(), torch.stack(agree)


def _decode(head: DraftHead, x_BSD: torch.Tensor, start: int, cache: list) -> tuple[torch.Tensor, list]:
    """The head's layers over positions start..start+S-1 after the cached ones (decoding): causal, each layer's
    keys and values appended to a copy of `cache` ([(K, V) or None] per layer), which is returned."""
    S = x_BSD.shape[1]
    cos, sin = head.rope_cos[start:start + S], head.rope_sin[start:start + S]
    mask = torch.ones(S, start + S, dtype=torch.bool, device=x_BSD.device).tril(start)
    out = []
    for layer, kv in zip(head.layers, cache, strict=True):
        past = [kv] if kv is not None else []
        x_BSD = layer(x_BSD, cos, sin, past, mask)
        out.append((torch.cat([k for k, _ in past], 2), torch.cat([v for _, v in past], 2)))
    return x_BSD, out


@torch.no_grad()
def head_generate(target, head: DraftHead, layers: list[int], prompt_BP: torch.Tensor, max_new: int, gamma: int,
                  greedy: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None):
    """Speculative decoding with a draft head over `target` (an expertmesh Transformer): each round the head
    catches up on the positions the target has verified (their features from the target's own forward, kept
    by hooks), drafts a chain of `gamma` tokens on its own features, and the target verifies them in one
    forward (the acceptance rule of `speculative.verify`: lossless). Requests advance in lockstep as in
    `speculative_generate`. Returns (generated tokens [B, max_new], DecodeStats)."""
    from expertmesh.distill.speculative import DecodeStats, _probs, advance, verify

    if gamma < 1 or max_new < 1 or prompt_BP.shape[1] < 2:
        raise ValueError(f"gamma={gamma} and max_new={max_new} must be >= 1, and a prompt at least 2 tokens "
                         f"(got {prompt_BP.shape[1]}): the head starts from the target's features of a position")
    kept: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, out):
            kept[i] = out[0] if isinstance(out, tuple) else out
        return hook

    hooks = [target.layers[str(i)].register_forward_hook(keep(i)) for i in sorted(set(layers))]
    emb, lm_head = target.tok_embeddings, target.output.weight
    dtype = head.fuse.weight.dtype

    def fused():
        return head.fuse(torch.cat([kept[i].to(dtype) for i in layers], -1))

    try:
        P = prompt_BP.shape[1]
        seq = prompt_BP.clone()
        t_cache = target.make_cache()
        target(seq[:, :-1], t_cache)
        feats = fused()  # [B, n, D]: the target's features of positions 0..n-1, n = t_cache.length = L - 1
        h_cache: list = [None] * len(head.layers)
        h_len = 0
        stats = DecodeStats(accepted_lengths=[])
        while seq.shape[1] - P < max_new:
            L = seq.shape[1]
            x = head.inputs(feats[:, h_len:L - 1], emb(seq[:, h_len + 1:L]).to(dtype))
            out, h_cache = _decode(head, x, h_len, h_cache)
            h_len = L - 1
            o, chain = out[:, -1:], h_cache
            drafts, q = [], []
            for i in range(gamma):
                qi = _probs(head.logits(o, lm_head.to(dtype))[:, 0], temperature)
                xi = qi.argmax(-1) if greedy else torch.multinomial(qi, 1, generator=generator)[:, 0]
                drafts.append(xi)
                q.append(qi)
                if i + 1 < gamma:
                    o, chain = _decode(head, head.inputs(o, emb(xi[:, None]).to(dtype)), h_len + i, chain)
            drafts_BG = torch.stack(drafts, 1)
            t_logits, _ = target(torch.cat([seq[:, t_cache.length:], drafts_BG], 1), t_cache)
            feats = torch.cat([feats, fused()], 1)
            p_BG1V = _probs(t_logits[:, -(gamma + 1):], temperature)
            v = verify(p_BG1V, torch.stack(q, 1), drafts_BG, greedy=greedy, generator=generator)
            seq = advance(seq, drafts_BG, v, stats)
            t_cache.crop(seq.shape[1] - 1)
            feats = feats[:, :seq.shape[1] - 1]
        return seq[:, P:P + max_new], stats
    finally:
        for h in hooks:
            h.remove()


def load_head(path, device=None) -> tuple[DraftHead, list[int], dict]:
    """A head saved beside a run (`runs/<name>/draft_head/`): the head, the target blocks it reads, its metadata."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "draft_head.json").read_text())
    head = DraftHead(ModelConfig(**meta["model"]), DraftHeadConfig(**meta["draft_head"]))
    head.load_state_dict(load_file(str(path / "model.safetensors")))
    return head.to(device) if device is not None else head, list(meta["layers"]), meta
