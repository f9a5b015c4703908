"""Deterministic, resumable token batches sharded by data-parallel rank.

The token stream is split once into train and held-out parts (the last `eval_fraction`).
Every step reads one global batch of random windows; each data-parallel rank takes its rows. The
batch depends only on (seed, micro-batch counter), so the batch sequence is the same under any
layout with the same global batch, and a checkpoint restores it from one integer. Evaluation
windows are fixed, evenly spaced positions in the held-out part.

Legend: B batch, S sequence length.
"""

from __future__ import annotations

import torch

from expertmesh.config import ConfigError


def split_tokens(tokens: torch.Tensor, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_eval = max(int(len(tokens) * eval_fraction), 1)
    return tokens[:-n_eval], tokens[-n_eval:]


class TokenLoader:
    """Step s of the run reads a global batch of `batch_size * world * accum` random windows drawn from
    the whole training split by a generator seeded with (seed, s), in blocks of `batch_size` rows:
    micro-batch i of data rank r reads block i * world + r. The state is a counter alone, so it
    means the same under any layout: a run with other parallel degrees or accumulation but the same
    global batch reads exactly the same windows, and so does a run resumed under another layout."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, rank: int, world: int, seed: int,
                 accum: int = 1, labels: torch.Tensor | None = None):
        self.seq_len, self.batch_size, self.rank, self.world, self.seed = seq_len, batch_size, rank, world, seed
        self.accum = accum
        if len(tokens) < seq_len + 2:
            raise ConfigError(f"the training split has {len(tokens)} tokens, fewer than one sequence of "
                              f"{seq_len + 1}; use more data or a shorter data.seq_len")
        self.tokens, self.labels = tokens, labels  # labels: the targets where they are not the next token
        self.batches_served = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = divmod(self.batches_served, self.accum)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = len(self.tokens) - self.seq_len
        starts = torch.randint(0, high, (self.batch_size * self.world * self.accum,), generator=gen)
        block = micro * self.world + self.rank
        mine = starts[block * self.batch_size: (block + 1) * self.batch_size]
        self.batches_served += 1
        return _windows(self.tokens, self.labels, mine.tolist(), self.seq_len)

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served, "global_batch": self.batch_size * self.world * self.accum}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = int(state["batches_served"])


def _windows(tokens, labels, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, S] and targets [B, S] of the windows starting at `starts` (targets from `labels` if given:
    the next token, or IGNORE where no loss counts)."""
    x_BS = torch.stack([tokens[s: s + seq_len] for s in starts])
    source = tokens if labels is None else labels
    return x_BS, torch.stack([source[s + 1: s + seq_len + 1] for s in starts])


def eval_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, num_batches: int, rank: int, world: int,
                 windows_world: int | None = None, labels: torch.Tensor | None = None):
    """Fixed held-out windows: `num_batches` global batches of evenly spaced windows over the held-out
    split, the same every evaluation and under any layout with the same global batch; data rank r
    of `world` reads its share of each. `windows_world` (default `world`) sizes the global batch: a
    DiLoCo worker evaluates the windows the whole job would, with only its own ranks."""
    windows_world = windows_world or world
    batch_size = batch_size * windows_world // world
    n_windows = min(num_batches * batch_size * world, (len(tokens) - 1) // seq_len)
    if n_windows < world:
        raise ConfigError(f"the held-out split has {len(tokens)} tokens: fewer than one sequence of {seq_len + 1} "
                          f"per data-parallel rank (x{world}); use more data or a shorter data.seq_len")
    step = (len(tokens) - seq_len - 1) // max(n_windows - 1, 1)
    starts = [i * step for i in range(n_windows)]
    global_batch = batch_size * world
    for b in range(0, n_windows, global_batch):
        chunk = starts[b: b + global_batch]
        per_rank = len(chunk) // world  # a short last batch is split evenly (the remainder dropped)
        mine = chunk[rank * per_rank: (rank + 1) * per_rank]
        if not mine:
            break
        yield _windows(tokens, labels, mine, seq_len)
