"""Which features combine: the compatibility matrix. The README's table is generated from it, and
tests/combinations.py proves every pair not refused here against a reference."""

from __future__ import annotations

import typing

from expertmesh.config.schema import ConfigError, JobConfig


def _dense_dp(cfg: JobConfig, world: int | None) -> int:
    """Ranks FSDP shards the dense weights over (None: the world size is not known yet)."""
    p = cfg.parallel
    if world is None:
        return 2 if p.dp != 1 or p.ep > 1 else 1  # dp = -1 takes whatever the world leaves: assume some
    dp = p.dp if p.dp > 0 else max(world // (p.pp * p.dp_replicate * p.ep * p.tp), 1)
    return dp * p.ep * (1 if cfg.diloco.enabled else p.dp_replicate)


# name -> (how a user turns it on, whether a config (and world size) has it on)
FEATURES: dict[str, tuple[str, typing.Callable[[JobConfig, int | None], bool]]] = {
    "ep": ("parallel.ep > 1", lambda c, w: c.parallel.ep > 1),
    "tp": ("parallel.tp > 1", lambda c, w: c.parallel.tp > 1),
    "pp": ("parallel.pp > 1", lambda c, w: c.parallel.pp > 1),
    "fsdp": ("parallel.dp_shard=true", lambda c, w: c.parallel.dp_shard and _dense_dp(c, w) > 1),
    "fssdp": ('moe.placement="fssdp"', lambda c, w: c.moe.placement == "fssdp"),
    "diloco": ("diloco.enabled=true", lambda c, w: c.diloco.enabled),
    "topk": ('diloco.compress="topk"', lambda c, w: c.diloco.enabled and c.diloco.compress == "topk"),
    "ac": ('parallel.activation_checkpoint="full"', lambda c, w: c.parallel.activation_checkpoint != "none"),
    "capacity": ("moe.capacity_factor > 0", lambda c, w: c.moe.capacity_factor > 0),
    "bias": ("moe.bias_update_rate > 0", lambda c, w: c.moe.bias_update_rate > 0),
    "pr-moe": ("moe.residual=true", lambda c, w: c.moe.residual),
    "shared": ("moe.shared_experts / shared_dim", lambda c, w: c.moe.shared_hidden > 0),
    "accum": ("train.grad_accum > 1", lambda c, w: c.train.grad_accum > 1),
    "bf16": ('train.mixed_precision="bf16"', lambda c, w: c.train.mixed_precision == "bf16"),
    "compile": ("train.compile=true", lambda c, w: c.train.compile),
    "draft_head": ("draft_head.enabled=true", lambda c, w: c.draft_head.enabled),
    "triton": ('moe.backend="triton"', lambda c, w: c.moe.backend in ("triton", "triton_fused")),
}

# Pairs refused at config time, with the reason (one line names both keys).
REFUSED: dict[frozenset[str], str] = {
    frozenset({"tp", "compile"}): "a compiled block's backward hands tensor parallelism's redistribution a plain "
                                  "tensor where it needs a DTensor (torch 2.13); run tp blocks eagerly",
    frozenset({"pp", "draft_head"}): "the head needs the target's logits and three blocks' features on one rank; a "
                                     "pipeline spreads them over its stages (not sent yet)",
    frozenset({"topk", "draft_head"}): "topk is a DiLoCo exchange, and the outer exchange does not carry the head "
                                       "(not yet)",  # before diloco's: the more specific pair names its key
    frozenset({"diloco", "draft_head"}): "each worker would train a head of its own: the outer exchange does not "
                                         "carry the head (not yet)",
}


def features_of(cfg: JobConfig, world: int | None = None) -> set[str]:
    return {name for name, (_, on) in FEATURES.items() if on(cfg, world)}


def check_combinations(cfg: JobConfig, world: int | None = None) -> None:
    on = features_of(cfg, world)
    for pair, why in REFUSED.items():
        if pair <= on:
            a, b = sorted(pair, key=list(FEATURES).index)
            raise ConfigError(f"{FEATURES[a][0]} with {FEATURES[b][0]} is refused: {why}")
