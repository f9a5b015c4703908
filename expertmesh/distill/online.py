"""Online draft distillation from the target's own verification passes (OSD; DistillSpec's divergences).

Legend: G = gamma drafted tokens per round, K top-k target probabilities kept per position, V vocabulary.

Each verification round already computed the target's distribution p at the G + 1 positions after
the request's current sequence. `Recorder` keeps, per request and round, the tokens the draft saw
(the sequence plus its drafts) and p, top-k compressed, at the positions chosen:
  "rejected"  only the first position where the draft's token was rejected (OSD);
  "all"       every drafted position whose context was accepted (0 .. first rejection);
  "onpolicy"  every drafted position, past the rejection too: the draft's own samples scored by the
              target in the same pass (DistillSpec's on-policy data, with no extra target forward).
`OnlineDistiller` keeps a bounded replay buffer of those examples and, every `update_every` requests,
takes optimizer steps on the draft minimizing divergence(p || q_draft) at the recorded positions.
No second target forward is ever run: the target logits are the verification pass's.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from expertmesh.dist.comm_stats import Comm, group_size
from expertmesh.distill.losses import densify, divergence


@dataclass
class Example:
    tokens: torch.Tensor  # [L] int64: the context the draft saw, ending with its drafted tokens
    targets: torch.Tensor  # [n] int64: indices into `tokens` of the predicted positions
    topk_idx: torch.Tensor  # [n, K] int64
    topk_p: torch.Tensor  # [n, K] float32: the target's probabilities there
    row: int = -1  # the request's row in its decoding batch (for `merge_on_path`)


POSITIONS = ("rejected", "all", "onpolicy")


def weights_vector(model: nn.Module) -> torch.Tensor:
    """Every parameter, flattened in order, as fp32 on the CPU: what a weight broadcast sends."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def load_weights_vector(model: nn.Module, flat: torch.Tensor) -> None:
    """Copies a `weights_vector` into the model's parameters (in place: dtype and device stay)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"weight vector of {flat.numel()} values for a model of {total} parameters")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def weights_digest(model: nn.Module) -> str:
    return hashlib.sha256(weights_vector(model).numpy().tobytes()).hexdigest()[:16]


class Recorder:
    """An `on_round` callback for `speculative_generate` that turns verification data into Examples."""

    def __init__(self, positions: str = "rejected", topk: int = 32) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} must be one of {', '.join(POSITIONS)}")
        self.positions, self.topk = positions, topk
        self.examples: list[Example] = []

    def __call__(self, seq_BL: torch.Tensor, drafts_BG: torch.Tensor, p_BG1V: torch.Tensor, verdict) -> None:
        B, G = drafts_BG.shape
        L = seq_BL.shape[1]
        k = min(self.topk, p_BG1V.shape[-1])
        top_p, top_i = p_BG1V.float().topk(k, dim=-1)
        for b in range(B):
            n = int(verdict.accepted_B[b])
            if self.positions == "rejected":
                js = [n] if n < G else []
            elif self.positions == "all":
                js = list(range(min(n, G - 1) + 1))
            else:
                js = list(range(G))
            if not js:
                continue
            tokens = torch.cat([seq_BL[b], drafts_BG[b]]).cpu()
            idx = torch.tensor(js)
            self.examples.append(Example(tokens, L + idx, top_i[b, idx].cpu(), top_p[b, idx].cpu(), b))

    def take(self) -> list[Example]:
        out, self.examples = self.examples, []
        return out


def merge_on_path(examples: list[Example], final_BL: torch.Tensor) -> list[Example]:
    """One example per request for every recorded position whose context lies on the request's final
    sequence (prompt + answer): rejected and accepted-context positions always do, so a request's
    rounds become one sequence the draft reads once instead of one per round. Positions off that
    path (on-policy drafts past a rejection) stay in their own examples."""
    final_BL = final_BL.cpu()
    on: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    out: list[Example] = []
    for e in examples:
        path = final_BL[e.row]
        keep = []
        for j, k in enumerate(e.targets.tolist()):
            if e.row >= 0 and k <= len(path) and torch.equal(e.tokens[:k], path[:k]):
                on.setdefault(e.row, []).append((k, e.topk_idx[j], e.topk_p[j]))
            else:
                keep.append(j)
        if keep:
            idx = torch.tensor(keep)
            out.append(Example(e.tokens, e.targets[idx], e.topk_idx[idx], e.topk_p[idx], e.row))
    for row, items in sorted(on.items()):
        items.sort(key=lambda t: t[0])
        out.append(Example(final_BL[row].clone(), torch.tensor([k for k, _, _ in items]),
                           torch.stack([i for _, i, _ in items]), torch.stack([q for _, _, q in items]), row))
    return out


class OnlineDistiller:
    """The draft's trainer: a replay buffer and an optimizer; `maybe_update` after each request."""

    def __init__(self, draft: nn.Module, vocab: int, kind: str = "fkl", beta: float = 0.5, lr: float = 3e-4,
                 buffer: int = 4096, batch: int = 16, steps: int = 1, update_every: int = 8, seed: int = 0) -> None:
        self.draft, self.vocab, self.kind, self.beta = draft, vocab, kind, beta
        self.buffer: deque[Example] = deque(maxlen=buffer)
        self.batch, self.steps, self.update_every = batch, steps, update_every
        self.optimizer = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.0)
        self.rng = random.Random(seed)
        self.requests = 0
        self.updates = 0
        self.last_loss = float("nan")

    def add(self, examples: list[Example]) -> None:
        self.buffer.extend(examples)

    def loss(self, batch: list[Example]) -> torch.Tensor:
        L = max(len(e.tokens) for e in batch)
        tokens = torch.zeros(len(batch), L, dtype=torch.int64)
        for i, e in enumerate(batch):  # right-padded: causal attention never looks at the padding
            tokens[i, :len(e.tokens)] = e.tokens
        device = next(self.draft.parameters()).device
        logits, _ = self.draft(tokens.to(device))
        rows = torch.cat([torch.full((len(e.targets),), i) for i, e in enumerate(batch)]).to(device)
        cols = torch.cat([e.targets - 1 for e in batch]).to(device)  # logits at t-1 predict token t
        p = densify(torch.cat([e.topk_idx for e in batch]), torch.cat([e.topk_p for e in batch]), self.vocab)
        return divergence(self.kind, logits[rows, cols], p.to(device), beta=self.beta)

    def update(self, group=None, comm: Comm | None = None) -> float:
        """`steps` optimizer steps on replay samples. With a process `group` of trainers, each samples
        its own buffer and the gradients are averaged over the group (every member must call this,
        an empty buffer contributing zeros), so the trainers' drafts stay identical."""
        self.draft.train()
        params = [p for p in self.draft.parameters() if p.requires_grad]
        for _ in range(self.steps):
            self.optimizer.zero_grad(set_to_none=False)
            if self.buffer:
                batch = self.rng.sample(list(self.buffer), min(self.batch, len(self.buffer)))
                loss = self.loss(batch)
                loss.backward()
                self.last_loss = float(loss.detach())
            for p in params:  # an empty buffer (or a parameter the batch did not reach) adds zeros
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if group is not None:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                (comm or Comm()).all_reduce(flat, group, "distill")
                flat /= group_size(group)
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
        self.draft.eval()
        self.updates += 1
        return self.last_loss

    def maybe_update(self, requests_done: int = 1) -> bool:
        """Counts finished requests; every `update_every` of them (with data) the draft takes its steps."""
        before = self.requests // self.update_every
        self.requests += requests_done
        if self.requests // self.update_every > before and self.buffer:
            self.update()
            return True
        return False
