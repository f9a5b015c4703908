"""Deterministic, resumable token batches sharded by data-parallel rank.

The token stream is split once into train and held-out parts (the last `eval_fraction`).
Each data-parallel rank owns one contiguous shard of the training part and draws random
windows from it with its own generator, seeded from (seed, rank); the generator state is the
loader's whole state, so a checkpoint restores the exact batch sequence. Evaluation windows are
fixed, evenly spaced positions in the rank's shard of the held-out part.

Legend: B batch, S sequence length.
"""

from __future__ import annotations

import torch

from expertmesh.config import ConfigError


def split_tokens(tokens: torch.Tensor, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_eval = max(int(len(tokens) * eval_fraction), 1)
    return tokens[:-n_eval], tokens[-n_eval:]


def shard(tokens: torch.Tensor, rank: int, world: int, min_len: int, what: str) -> torch.Tensor:
    size = len(tokens) // world
    if size < min_len:
        raise ConfigError(
            f"the {what} split has {len(tokens)} tokens: {size} per data-parallel rank (x{world}) "
            f"is fewer than one sequence of {min_len}; use more data or a shorter data.seq_len"
        )
    return tokens[rank * size: (rank + 1) * size]


class TokenLoader:
    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, rank: int, world: int, seed: int):
        self.seq_len, self.batch_size, self.rank, self.world = seq_len, batch_size, rank, world
        self.tokens = shard(tokens, rank, world, seq_len + 1, "training")
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.batches_served = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self.gen)
        window_BS1 = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()])
        self.batches_served += 1
        return window_BS1[:, :-1], window_BS1[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "batches_served": self.batches_served,
                "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(
                f"loader state is for data rank {state['rank']} of {state['world']}, "
                f"this loader is rank {self.rank} of {self.world}"
            )
        self.gen.set_state(state["generator"])
        self.batches_served = state["batches_served"]


def eval_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, num_batches: int, rank: int, world: int):
    """Fixed held-out windows: the same every evaluation, disjoint across ranks."""
    part = shard(tokens, rank, world, seq_len + 1, "held-out")
    n_windows = min(num_batches * batch_size, (len(part) - 1) // seq_len)
    step = (len(part) - seq_len - 1) // max(n_windows - 1, 1) if n_windows > 1 else 0
    starts = [i * step for i in range(n_windows)]
    for b in range(0, n_windows, batch_size):
        window = torch.stack([part[s: s + seq_len + 1] for s in starts[b: b + batch_size]])
        yield window[:, :-1], window[:, 1:]
