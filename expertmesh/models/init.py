"""Initialization rules of the transformer's tensors, by name, and `SeededInit`, which draws any slice
of any tensor from the seed alone.

A sharded model never builds the full model: each rank asks `SeededInit` for the slices it holds
(dist/shards.py). A tensor is drawn in blocks of rows (dim 0), each from its own generator seeded
from the run's seed, the tensor's name and the block: one expert per block for stacked expert tensors,
about a million values per block otherwise. A rank draws only the blocks its rows fall in, and the
full weights are the same whatever the layout.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from expertmesh.config import ModelConfig
from expertmesh.dist.shards import fill

_OUT_PROJECTIONS = ("wo.weight", "w2.weight", "experts.w2")  # scaled down with depth
_STACKED_EXPERTS = ("experts.w1", "experts.w2", "experts.w3")


def is_stacked_expert(name: str) -> bool:
    return name.endswith(_STACKED_EXPERTS)


@torch.no_grad()
def init_tensor(m: ModelConfig, name: str, t: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Fills `t`, the whole tensor `name` (or one expert's slice of a stacked expert tensor)."""
    if name.endswith("rope_cos") or name.endswith("rope_sin"):
        return
    if name == "output.weight" and m.tie_embeddings:
        return  # the embedding's own tensor
    if name == "tok_embeddings.weight":
        nn.init.normal_(t, std=1.0, generator=generator)
    elif name == "output.weight":
        nn.init.trunc_normal_(t, std=m.dim**-0.5, generator=generator)
    elif name.endswith("norm.weight"):
        nn.init.ones_(t)
    elif name.endswith(".bias") or name.endswith("expert_bias"):
        nn.init.zeros_(t)
    elif name.endswith(_OUT_PROJECTIONS):
        nn.init.trunc_normal_(t, std=m.init_std / math.sqrt(2 * m.n_layers), generator=generator)
    else:
        nn.init.trunc_normal_(t, std=m.init_std, generator=generator)


def _generator(seed: int, *parts) -> torch.Generator:
    key = zlib.crc32(":".join(map(str, parts)).encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % (1 << 63))


class SeededInit:
    """`read(name, shape, index, out)`: the slice `index` of tensor `name` (global `shape`) as the seed makes it."""

    def __init__(self, m: ModelConfig, seed: int) -> None:
        self.m, self.seed = m, seed

    BLOCK_VALUES = 1 << 20

    def read(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...], out: torch.Tensor) -> None:
        fill(out, self.draw(name, shape, index), name)

    def draw(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
        """The slice `index` of tensor `name`."""
        if len(shape) == 0 or shape[0] == 0:
            full = torch.empty(shape)
            init_tensor(self.m, name, full, _generator(self.seed, name))
            return full[index]
        row = torch.Size(shape[1:]).numel()
        block = 1 if is_stacked_expert(name) else max(1, self.BLOCK_VALUES // max(row, 1))
        first, stop = index[0].start, index[0].stop
        parts = []
        for b in range(first // block, -(-stop // block) if stop > first else first // block):
            rows = torch.empty(min(block, shape[0] - b * block), *shape[1:])
            init_tensor(self.m, name, rows, _generator(self.seed, name, b))
            lo, hi = max(first - b * block, 0), min(stop - b * block, rows.shape[0])
            parts.append(rows[(slice(lo, hi), *index[1:])])
        if not parts:
            return torch.empty(shape)[index]
        return torch.cat(parts)
