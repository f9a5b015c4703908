"""The language-model loss over token positions, shared by the step, the pipeline's last stage and
evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.data.chat import IGNORE


def token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the positions that carry a loss (chat data marks the others IGNORE)."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return total if reduction == "sum" else total / (y != IGNORE).sum().clamp_min(1)
