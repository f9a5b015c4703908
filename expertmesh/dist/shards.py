"""Filling a parallelized model slice by slice: each rank reads only what it holds.

After `shard_model` every weight is either a plain tensor (held whole) or a DTensor that knows its
global shape and which part of it this rank keeps (tensor, expert and FSDP sharding compose into one
placement). `load_shards` asks a source for exactly those parts: `SeededInit` draws them from the
seed (models/init.py), an HF checkpoint reads them from its safetensors (models/hf/). No rank ever
builds the full model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

_WRAPPED = "_checkpoint_wrapped_module."


def local_index(t: torch.Tensor) -> tuple[slice, ...]:
    """The part of the global tensor this rank holds, one slice per dim."""
    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def model_tensors(model: nn.Module):
    """(name, tensor) of every parameter and persistent buffer, names as in an unsharded model."""
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied weights: one tensor, read once
            continue
        seen.add(id(t))
        yield name.replace(_WRAPPED, ""), t


def fill(out: torch.Tensor, part: torch.Tensor, name: str) -> None:
    """out <- part (cast to out's dtype), refusing a part of another shape (copy_ would broadcast it)."""
    if tuple(part.shape) != tuple(out.shape):
        raise RuntimeError(f"{name}: the source gave a slice of shape {tuple(part.shape)} for this rank's "
                           f"{tuple(out.shape)}")
    out.copy_(part)


@torch.no_grad()
def load_shards(model: nn.Module, read) -> None:
    """`read(name, global_shape, index, out)` fills `out`, this rank's part of every tensor of `model`."""
    for name, t in model_tensors(model):
        read(name, tuple(t.shape), local_index(t), t.to_local() if isinstance(t, DTensor) else t)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor, without autograd: for in-place updates."""
    return t._local_tensor if isinstance(t, DTensor) else t
