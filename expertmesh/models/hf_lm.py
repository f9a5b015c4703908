"""Hugging Face `transformers` causal LMs behind the interface expertmesh's decoding and distillation use:
`forward(tokens, cache=None) -> (logits, [])`, `make_cache()`, `vocab_size`, `max_positions`.

Models load from a local directory only (`save_pretrained` output); nothing is downloaded. The cache
wraps transformers' `DynamicCache`, whose `crop` takes the number of tokens to drop, as the
`length` / `crop(n)` pair `speculative_generate` expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def hf_family(path: str | Path) -> str | None:
    """The `model_type` a `save_pretrained` directory's config.json names; None for any other directory."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def is_hf_dir(path: str | Path) -> bool:
    return hf_family(path) is not None


class HFCache:
    def __init__(self, config) -> None:
        from transformers import DynamicCache

        self.inner = DynamicCache(config=config)

    @property
    def length(self) -> int:
        return int(self.inner.get_seq_length())

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        if length < self.length:
            self.inner.crop(length - self.length)  # transformers: a negative count of tokens to remove


class HFCausalLM(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise ImportError("loading a Hugging Face model needs `transformers`: pip install 'expertmesh[hf]'") \
                from None
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        return cls(model.to(device).eval())

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    @property
    def max_positions(self) -> int:
        c = self.hf.config
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1 << 30)

    def make_cache(self) -> HFCache:
        return HFCache(self.hf.config)

    def forward(self, tokens_BS: torch.Tensor, cache: HFCache | None = None) -> tuple[torch.Tensor, list]:
        start, S = (cache.length if cache is not None else 0), tokens_BS.shape[1]
        if start + S > self.max_positions:
            raise ValueError(f"position {start + S} exceeds the model's {self.max_positions} positions")
        out = self.hf(input_ids=tokens_BS, past_key_values=cache.inner if cache is not None else None,
                      use_cache=cache is not None)
        return out.logits, []
