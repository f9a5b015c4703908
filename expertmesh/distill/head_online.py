"""A draft head as `expertmesh distill`'s draft, distilled online from the verification passes.

    distill.draft = "head"                    a new head over the target (its shape from `draft_head.*`)
    distill.draft = "runs/<name>/draft_head"  a head saved by a training run (`draft_head.enabled`) or by distill

The servers decode with `head_generate` (chains of `distill.gamma`, or trees of `distill.tree`) and keep,
per request, what the target's prefill and verification passes computed at every position of the final
sequence: the three blocks' features and the top-k distribution (`HeadTrace`). That is the whole input of
the head's training-time-test loss, so the trainers train on it with no target forward of their own: one
example per request, the head unrolled `draft_head.ttt_steps` steps over its sequence, against the target's
distribution under `distill.divergence`. Trainers, replay, weight broadcasts, versions and resume are those
of draft models (server.py); the head's weights are the only ones that move (the target's embedding and LM
head are shared and frozen). Legend: B requests, L positions, F = 3 D features, K top-k, V vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from expertmesh.config import ConfigError, DraftHeadConfig, JobConfig
from expertmesh.config.checks import draft_head_layers
from expertmesh.distill.head import DraftHead, load_head, save_head, ttt_loss_p
from expertmesh.distill.losses import densify
from expertmesh.distill.online import OnlineDistiller

HEAD_META = "draft_head.json"


def is_head(path: str) -> bool:
    """Whether `distill.draft` names a draft head: "head" (a new one) or a directory `save_head` wrote."""
    return path == "head" or (Path(path) / HEAD_META).is_file()


@dataclass
class FeatureExample:
    tokens: torch.Tensor  # [L] int64: a request's final sequence (prompt + answer)
    feats: torch.Tensor  # [L-1, F] float32: the target's three features at positions 0..L-2
    topk_idx: torch.Tensor  # [L-1, K] int64: the target's distribution of the token after each position
    topk_p: torch.Tensor  # [L-1, K] float32


class HeadDraft(nn.Module):
    """The head and what drafting with it needs from the target (its blocks, embedding and LM head, held but not
    owned: `parameters()` are the head's alone, so weight vectors and optimizers see only the head)."""

    def __init__(self, head: DraftHead, layers: list[int], target, head_cfg) -> None:
        super().__init__()
        self.head, self.layers, self.head_cfg = head, list(layers), head_cfg
        self.model_cfg = target.cfg
        self._target = (target.tok_embeddings, target.output.weight)  # a tuple: not registered as submodules
        self.vocab_size, self.max_positions = target.vocab_size, target.max_positions

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._target[0](tokens)

    @property
    def lm_head(self) -> torch.Tensor:
        return self._target[1]

    @torch.no_grad()
    def step_seconds(self, batch: int, prompt_len: int, reps: int = 3) -> float:
        """Seconds of one drafted token: a head step after `prompt_len` cached positions and its LM-head
        projection (the median of `reps`; what `measure_costs` weighs against the target's passes)."""
        import statistics
        import time

        from expertmesh.distill.head import _decode

        w = self.head.fuse.weight
        D = w.shape[0]
        x = torch.randn(batch, prompt_len + 1, D, device=w.device, dtype=w.dtype)
        times = []
        for _ in range(reps + 1):
            _, cache = _decode(self.head, x[:, :prompt_len], 0, [None] * len(self.head.layers))
            if w.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, _ = _decode(self.head, x[:, prompt_len:], prompt_len, cache)
            self.head.logits(out, self.lm_head.to(w.dtype)).softmax(-1)
            if w.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])


def load_head_draft(path: str | Path, target, cfg: JobConfig, device: torch.device) -> HeadDraft:
    """`distill.draft` as a head over `target` (an expertmesh model): a new one ("head", seeded by
    `train.seed`) or one saved beside a run, checked against the target's widths and blocks."""
    if not hasattr(target, "cfg") or not hasattr(target, "layers"):
        raise ConfigError(f"distill.draft={str(path)!r} is a draft head, which reads the target's blocks: "
                          f"distill.target={cfg.distill.target!r} must be an expertmesh model (a run directory or "
                          "a Hugging Face family expertmesh implements)")
    m = target.cfg
    if str(path) == "head":
        h = cfg.draft_head
        layers = draft_head_layers(SimpleNamespace(model=m, draft_head=h))
        if len(layers) != 3 or not all(0 <= i < m.n_layers for i in layers):
            raise ConfigError(f"draft_head.layers={h.layers} must name three blocks of the target's "
                              f"{m.n_layers}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 1)
            head = DraftHead(m, h)
    else:
        head, layers, meta = load_head(path)
        h = DraftHeadConfig(**meta["draft_head"])
        theirs = meta["model"]
        mismatch = {k: (theirs.get(k), getattr(m, k)) for k in ("dim", "vocab_size", "n_heads", "n_kv_heads")
                    if theirs.get(k) != getattr(m, k)}
        if mismatch or max(layers) >= m.n_layers:
            raise ConfigError(f"the draft head {path} was made for another target: (head, target) {mismatch}, "
                              f"blocks {layers} of {m.n_layers}")
    return HeadDraft(head.to(device), layers, target, h)


def saved_progress(saved: Path) -> dict:
    """The version and update count of the head a previous attempt of this run saved ({0, 0} if none)."""
    meta = saved / HEAD_META
    d = json.loads(meta.read_text()) if meta.is_file() else {}
    return {"version": d.get("version", 0), "updates": d.get("updates", 0)}


def save_head_draft(draft: HeadDraft, out: Path, meta: dict) -> Path:
    return save_head(draft.head, draft.layers, draft.model_cfg, draft.head_cfg, out, meta)


def trace_examples(trace) -> list[FeatureExample]:
    return [FeatureExample(*row) for row in trace.rows()]


class HeadDistiller(OnlineDistiller):
    """`OnlineDistiller` for a head: examples are whole requests with the target's features; the loss is the
    training-time test over them (right-padded to the longest in the batch)."""

    def loss(self, batch: list[FeatureExample]) -> torch.Tensor:
        d: HeadDraft = self.draft
        device = d.lm_head.device
        n = max(len(e.feats) for e in batch)
        B, F, K = len(batch), batch[0].feats.shape[1], batch[0].topk_idx.shape[1]
        tokens = torch.zeros(B, n, dtype=torch.int64)
        feats = torch.zeros(B, n, F)
        idx = torch.zeros(B, n, K, dtype=torch.int64)
        top = torch.zeros(B, n, K)
        valid = torch.zeros(B, n, dtype=torch.bool)
        for i, e in enumerate(batch):
            m = len(e.feats)
            tokens[i, :m], feats[i, :m], idx[i, :m], top[i, :m], valid[i, :m] = e.tokens[:m], e.feats, e.topk_idx, \
                e.topk_p, True
        p = densify(idx.flatten(0, 1), top.flatten(0, 1), self.vocab).view(B, n, -1)
        h = d.head_cfg
        with torch.no_grad():
            emb = d.embed(tokens.to(device))
        loss, _, agree = ttt_loss_p(d.head, list(feats.to(device).chunk(len(d.layers), -1)), emb, p.to(device),
                                    d.lm_head.detach(), h.ttt_steps, h.step_decay, self.kind, self.beta,
                                    valid.to(device))
        self.last_top1 = float(agree[0])
        return loss
