"""Lossless speculative decoding: the acceptance rule that makes draft-then-verify sample exactly the
target's distribution (Leviathan et al. 2023; Chen et al. 2023).

Legend: B requests, G = gamma drafted tokens, V vocabulary. For each request the draft proposed
x_0..x_{G-1} with probabilities q_i(.), and the target scored all G + 1 positions in one forward:
p_0..p_G. Sampling mode: x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), left to right;
at the first rejection j the next token is drawn from norm(max(0, p_j - q_j)); if all G are accepted,
a bonus token is drawn from p_G. Each emitted token is then distributed exactly as p. Greedy mode
accepts x_i only when it is the target's argmax, and emits the target's argmax after the last
accepted one, so the output equals the target's own greedy decoding token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    accepted_B: torch.Tensor  # int64: how many drafted tokens each request keeps (0..G)
    next_token_B: torch.Tensor  # int64: the token emitted after them (residual, or bonus when all kept)
    alpha_B: torch.Tensor  # mean over the drafted positions of sum_v min(p, q): the expected acceptance rate


def verify(p_BG1V: torch.Tensor, q_BGV: torch.Tensor, draft_BG: torch.Tensor, greedy: bool = False,
           generator: torch.Generator | None = None) -> Verdict:
    B, G, V = q_BGV.shape
    if p_BG1V.shape != (B, G + 1, V) or draft_BG.shape != (B, G):
        raise ValueError(f"target probabilities {tuple(p_BG1V.shape)} must be [B, G+1, V] = {(B, G + 1, V)} and "
                         f"drafted tokens {tuple(draft_BG.shape)} [B, G] = {(B, G)}")
    p, q = p_BG1V.double(), q_BGV.double()
    alpha_B = torch.minimum(p[:, :G], q).sum(-1).mean(-1) if G else torch.ones(B, dtype=torch.float64)
    if greedy:
        ok_BG = p[:, :G].argmax(-1) == draft_BG
    else:
        px = p[:, :G].gather(-1, draft_BG[..., None])[..., 0]
        qx = q.gather(-1, draft_BG[..., None])[..., 0]
        u = torch.rand(B, G, dtype=torch.float64, generator=generator, device=p.device)
        ok_BG = u * qx < px  # u < p/q without dividing by a zero q
    accepted_B = ok_BG.long().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, accepted_B]  # [B, V]: p at the first rejected position, or p_G for the bonus
    if greedy:
        return Verdict(accepted_B, p_next.argmax(-1), alpha_B)
    rejected = accepted_B < G
    q_next = torch.zeros_like(p_next)
    q_next[rejected] = q[rows[rejected], accepted_B[rejected]]
    residual = (p_next - q_next).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    dist = torch.where(mass > 0, residual / mass.clamp_min(1e-300), p_next)  # p == q: any draw from p is right
    next_token_B = torch.multinomial(dist, 1, generator=generator)[:, 0]
    return Verdict(accepted_B, next_token_B, alpha_B)
