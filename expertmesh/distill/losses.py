"""Divergences between the target's distribution p and the draft's q, for draft distillation.

Legend: N positions, V vocabulary. Every function takes the draft's logits (what is trained) and the
target's probabilities (fixed: from the verification pass, never a second target forward) and returns
the mean over positions (or the per-position values with reduction="none").

  fkl     KL(p || q)      forward KL: mass-covering (OSD's default)
  rkl     KL(q || p)      reverse KL: mode-seeking
  jsd     beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (DistillSpec's JSD[beta])
  tvd     1/2 sum |p - q| (the quantity speculative decoding's acceptance rate is 1 minus)

Targets arrive top-k compressed (`densify`): the k largest probabilities exactly, the rest of the mass
spread evenly over the other V - k tokens, so p stays a distribution and every divergence is finite.
"""

from __future__ import annotations

import torch

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def densify(topk_idx_NK: torch.Tensor, topk_p_NK: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V] probabilities from the k largest ones; the remaining mass is spread over the other tokens."""
    N, K = topk_idx_NK.shape
    if K > vocab:
        raise ValueError(f"top-k of {K} exceeds the vocabulary of {vocab}")
    if K == vocab:
        return torch.zeros(N, vocab, dtype=topk_p_NK.dtype, device=topk_p_NK.device).scatter_(1, topk_idx_NK, topk_p_NK)
    rest = (1.0 - topk_p_NK.sum(-1, keepdim=True)).clamp_min(0.0) / (vocab - K)
    out = rest.expand(N, vocab).clone()
    return out.scatter_(1, topk_idx_NK, topk_p_NK)


def _kl(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities (0 log 0 = 0)."""
    a = a_log.exp()
    return torch.where(a > 0, a * (a_log - b_log), torch.zeros_like(a)).sum(-1)


def divergence(kind: str, draft_logits_NV: torch.Tensor, target_p_NV: torch.Tensor, beta: float = 0.5,
               reduction: str = "mean") -> torch.Tensor:
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r} is not one of {', '.join(DIVERGENCES)}")
    if draft_logits_NV.shape != target_p_NV.shape:
        raise ValueError(f"draft logits {tuple(draft_logits_NV.shape)} and target probabilities "
                         f"{tuple(target_p_NV.shape)} differ in shape")
    if not 0.0 < beta < 1.0 and kind == "jsd":
        raise ValueError(f"jsd beta={beta} must be in (0, 1)")
    q_log = draft_logits_NV.float().log_softmax(-1)
    p = target_p_NV.float()
    p_log = p.clamp_min(1e-30).log()
    if kind == "fkl":
        per = _kl(p_log, q_log)
    elif kind == "rkl":
        per = _kl(q_log, p_log)
    elif kind == "tvd":
        per = 0.5 * (p - q_log.exp()).abs().sum(-1)
    else:
        m_log = torch.logaddexp(p_log + torch.log(torch.tensor(beta)), q_log + torch.log(torch.tensor(1 - beta)))
        per = beta * _kl(p_log, m_log) + (1 - beta) * _kl(q_log, m_log)
    if reduction == "none":
        return per
    return per.mean() if per.numel() else per.sum()
