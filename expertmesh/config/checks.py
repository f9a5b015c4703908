"""Every check that needs no process group, made before any rank starts; each error names the key and
the numbers involved."""

from __future__ import annotations

import typing
from pathlib import Path

from expertmesh.config.matrix import check_combinations
from expertmesh.config.schema import ConfigError, JobConfig, ModelConfig, ParallelConfig, suggest


def _positive(cfg: JobConfig, keys: typing.Iterable[str]) -> None:
    for dotted in keys:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value <= 0:
            raise ConfigError(f"{dotted}={value} must be > 0")


def check(cfg: JobConfig) -> None:
    m, e, d, o, t = cfg.model, cfg.moe, cfg.data, cfg.optim, cfg.train
    _positive(cfg, [
        "model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.ffn_dim",
        "model.max_seq_len", "moe.num_experts", "moe.top_k", "moe.every", "moe.expert_dim",
        "data.seq_len", "data.batch_size", "optim.lr", "train.steps", "train.grad_accum",
        "train.eval_every", "train.eval_batches", "checkpoint.every", "checkpoint.keep",
        "metrics.log_every", "parallel.dp_replicate", "parallel.ep", "parallel.tp", "parallel.pp",
    ])
    check_attention(m)
    if t.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision='fp16' needs a loss scaler, which expertmesh does not have; "
                          "use 'bf16' (fp32's range, no scaling needed)")
    if e.first_k_dense < 0 or e.routed_scaling_factor <= 0 or e.shared_dim < 0:
        raise ConfigError(f"moe.first_k_dense={e.first_k_dense} and moe.shared_dim={e.shared_dim} must be >= 0, "
                          f"moe.routed_scaling_factor={e.routed_scaling_factor} > 0")
    if e.shared_gate and not e.shared_hidden:
        raise ConfigError("moe.shared_gate=true needs a shared expert (moe.shared_experts or moe.shared_dim)")
    moe_layers = sum(1 for i in range(m.n_layers) if e.is_moe(i))
    if e.num_experts_per_layer and len(e.num_experts_per_layer) != moe_layers:
        raise ConfigError(f"moe.num_experts_per_layer has {len(e.num_experts_per_layer)} entries but the model has "
                          f"{moe_layers} MoE layers (model.n_layers={m.n_layers}, moe.every={e.every})")
    for n in e.experts_in_layers(m.n_layers):
        if e.top_k > n:
            raise ConfigError(f"moe.top_k={e.top_k} exceeds moe.num_experts={n}")
        if n % e.n_groups:
            raise ConfigError(f"moe.n_groups={e.n_groups} does not divide moe.num_experts={n}")
        if e.top_k > e.topk_groups * (n // e.n_groups):
            raise ConfigError(f"moe.top_k={e.top_k} exceeds the {e.topk_groups * (n // e.n_groups)} experts in "
                              f"moe.topk_groups={e.topk_groups} groups of {n // e.n_groups}")
    if not 1 <= e.topk_groups <= e.n_groups:
        raise ConfigError(f"moe.topk_groups={e.topk_groups} must be in [1, moe.n_groups={e.n_groups}]")
    if e.bias_update_rate < 0:
        raise ConfigError(f"moe.bias_update_rate={e.bias_update_rate} must be >= 0")
    if e.capacity_factor < 0:
        raise ConfigError(f"moe.capacity_factor={e.capacity_factor} must be >= 0 (0 = dropless)")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in (0, 1)")
    if d.source == "files" and not d.paths:
        raise ConfigError("data.source='files' needs data.paths (a list of globs)")
    if d.tokenizer == "byte" and m.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is below 256, the byte tokenizer's vocabulary")
    if d.tokenizer == "bpe" and not d.tokenizer_path and d.bpe_vocab_size < 260:
        raise ConfigError(f"data.bpe_vocab_size={d.bpe_vocab_size} must be >= 260")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps}, optim.grad_clip={o.grad_clip}, "
            f"optim.weight_decay={o.weight_decay} must all be >= 0"
        )
    if t.threads < 0:
        raise ConfigError(f"train.threads={t.threads} must be >= 0 (0 = automatic)")
    p = cfg.parallel
    if p.dp == 0 or p.dp < -1:
        raise ConfigError(f"parallel.dp={p.dp} must be positive or -1 (the rest of WORLD_SIZE)")
    for n in e.experts_in_layers(m.n_layers):
        if n % p.ep:
            raise ConfigError(f"parallel.ep={p.ep} does not divide moe.num_experts={n}")
    if m.n_heads % p.tp or (m.n_kv_heads or m.n_heads) % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads} and model.n_kv_heads="
                          f"{m.n_kv_heads or m.n_heads}")
    for key, value in (("model.ffn_dim", m.ffn_dim), ("moe.expert_dim", e.expert_dim),
                       ("moe.shared_dim", e.shared_dim)):
        if value % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide {key}={value}")
    if p.tp > 1:
        if p.sequence_parallel and d.seq_len % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide data.seq_len={d.seq_len} "
                              "(sequence parallelism splits the sequence; or set parallel.sequence_parallel=false)")
        if p.vocab_parallel and m.vocab_size % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide model.vocab_size={m.vocab_size} "
                              "(or set parallel.vocab_parallel=false)")
        if m.tie_embeddings:
            raise ConfigError(f"model.tie_embeddings=true is not supported with parallel.tp={p.tp}")
    if cfg.checkpoint.export_hf and not (m.hf_path and cfg.checkpoint.enabled):
        raise ConfigError(f"checkpoint.export_hf=true needs model.hf_path (got {m.hf_path!r}) and checkpoint.enabled="
                          f"true (got {str(cfg.checkpoint.enabled).lower()}): it exports the last checkpoint")
    if d.format == "chat" and (d.source != "files" or d.tokenizer != "hf"):
        raise ConfigError(f"data.format='chat' reads data.paths with the checkpoint's tokenizer and chat template: "
                          f"needs data.source='files' (got {d.source!r}) and data.tokenizer='hf' (got {d.tokenizer!r})")
    if d.loss_on == "assistant" and d.format != "chat":
        raise ConfigError(f"data.loss_on='assistant' needs data.format='chat' (got {d.format!r})")
    if d.tokenizer == "hf" and not (d.tokenizer_path or m.hf_path):
        raise ConfigError("data.tokenizer='hf' reads tokenizer.json from model.hf_path or data.tokenizer_path; "
                          "both are empty")
    check_pipeline(cfg)
    check_diloco(cfg)
    check_fssdp(cfg)
    check_distill(cfg)
    check_draft_head(cfg)
    check_fused_moe(cfg)
    check_combinations(cfg)


def check_fused_moe(cfg: JobConfig) -> None:
    """The fused Triton kernel computes a whole MoE layer on one rank: every expert, its whole hidden dim."""
    if cfg.moe.backend != "triton_fused":
        return
    p = cfg.parallel
    for key, on in (("parallel.ep > 1", p.ep > 1), ("parallel.tp > 1", p.tp > 1),
                    ('moe.placement="fssdp"', cfg.moe.placement == "fssdp")):
        if on:
            raise ConfigError(f'moe.backend="triton_fused" with {key} is refused: the fused kernel runs a whole MoE '
                              'layer on one rank (every expert, its whole hidden dim); use moe.backend="triton"')


# Pipeline schedules: name -> (stages per rank it takes: exactly n, or at least n when negative; style)
PP_SCHEDULES = {"1F1B": (1, "loop"), "Interleaved1F1B": (-2, "loop"), "ZBVZeroBubble": (2, "v"), "DualPipeV": (2, "v")}


def pp_microbatches(p: ParallelConfig) -> int:
    return p.pp_microbatches or p.pp * p.pp_stages_per_rank


def check_pipeline(cfg: JobConfig) -> None:
    """Pipeline parallelism's settings, refused with the numbers; the installed torch's schedules are
    checked where the pipeline is built (parallel/pipeline.py), as config files outlive installs."""
    p, m = cfg.parallel, cfg.model
    if p.pp < 1 or p.pp_stages_per_rank < 1 or p.pp_microbatches < 0:
        raise ConfigError(f"parallel.pp={p.pp} and parallel.pp_stages_per_rank={p.pp_stages_per_rank} must be >= 1, "
                          f"parallel.pp_microbatches={p.pp_microbatches} >= 0 (0: pp * stages_per_rank)")
    if p.pp == 1:
        if p.pp_layout or p.pp_stages_per_rank != 1:
            raise ConfigError(f"parallel.pp_layout={p.pp_layout} and parallel.pp_stages_per_rank={p.pp_stages_per_rank}"
                              " need parallel.pp > 1")
        return
    if p.pp_schedule not in PP_SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={p.pp_schedule!r} is not one of {', '.join(PP_SCHEDULES)}"
                          + suggest(p.pp_schedule, PP_SCHEDULES))
    want, _ = PP_SCHEDULES[p.pp_schedule]
    v = p.pp_stages_per_rank
    if (want > 0 and v != want) or (want < 0 and v < -want):
        need = f"exactly {want}" if want > 0 else f">= {-want}"
        raise ConfigError(f"parallel.pp_schedule={p.pp_schedule!r} runs {need} stages per rank; "
                          f"parallel.pp_stages_per_rank={v}")
    stages = p.pp * v
    if p.pp_layout:
        if len(p.pp_layout) != stages or any(n < 1 for n in p.pp_layout) or sum(p.pp_layout) != m.n_layers:
            raise ConfigError(f"parallel.pp_layout={p.pp_layout} must give {stages} stages (pp={p.pp} x "
                              f"stages_per_rank={v}) of >= 1 layer each, summing to model.n_layers={m.n_layers} "
                              f"(it sums to {sum(p.pp_layout)})")
    elif stages > m.n_layers:
        raise ConfigError(f"parallel.pp={p.pp} x parallel.pp_stages_per_rank={v} = {stages} stages exceed "
                          f"model.n_layers={m.n_layers}: every stage needs a layer")
    micro = pp_microbatches(p)
    rounds = max(1, micro // p.pp)
    need = {"1F1B": (micro >= p.pp, f">= pp={p.pp}"), "DualPipeV": (micro >= stages, f">= the {stages} stages"),
            "Interleaved1F1B": (micro % rounds == 0, f"a multiple of max(1, microbatches // pp) = {rounds}"),
            "ZBVZeroBubble": (True, "")}[p.pp_schedule]
    if not need[0]:
        raise ConfigError(f"parallel.pp_schedule={p.pp_schedule!r} with pp={p.pp} needs parallel.pp_microbatches "
                          f"{need[1]}; got {micro}")
    if m.tie_embeddings:
        raise ConfigError(f"model.tie_embeddings=true is not supported with parallel.pp={p.pp}: the embedding and "
                          "the output head live on different stages")


def check_attention(m: ModelConfig) -> None:
    if m.attention == "mla":
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if getattr(m, key) < 1:
                raise ConfigError(f"model.attention='mla' needs model.{key} >= 1, got {getattr(m, key)}")
        if m.q_lora_rank < 0:
            raise ConfigError(f"model.q_lora_rank={m.q_lora_rank} must be >= 0 (0 = a full q projection)")
        rotary = m.qk_rope_head_dim
    else:
        if m.head_dim < 0 or m.n_kv_heads < 0:
            raise ConfigError(f"model.head_dim={m.head_dim} and model.n_kv_heads={m.n_kv_heads} must be >= 0 "
                              "(0 = derived)")
        if not m.head_dim and m.dim % m.n_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.dim={m.dim} (or set model.head_dim)")
        if m.n_heads % (m.n_kv_heads or m.n_heads):
            raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
        rotary = m.head_dim or m.dim // m.n_heads
    if rotary % 2:
        raise ConfigError(f"the rotary head dim {rotary} must be even for RoPE")
    if m.rope_scaling == "yarn" and (m.rope_factor < 1 or m.rope_original_max_seq_len < 1):
        raise ConfigError(f"model.rope_scaling='yarn' needs model.rope_factor={m.rope_factor} >= 1 and "
                          f"model.rope_original_max_seq_len={m.rope_original_max_seq_len} >= 1")


def check_distill(cfg: JobConfig) -> None:
    g = cfg.distill
    for key in ("trainers", "gamma", "gamma_min", "max_new_tokens", "batch_size", "prompt_len", "topk", "buffer",
                "update_every", "update_steps", "update_batch", "window"):
        if getattr(g, key) < 1:
            raise ConfigError(f"distill.{key}={getattr(g, key)} must be >= 1")
    if g.adaptive_gamma and g.gamma_by_cost:
        raise ConfigError("distill.adaptive_gamma and distill.gamma_by_cost are two rules for one gamma: choose one")
    if (g.adaptive_gamma or g.gamma_by_cost) and not g.gamma_min <= g.gamma <= g.gamma_max:
        raise ConfigError(f"distill.adaptive_gamma needs gamma_min={g.gamma_min} <= gamma={g.gamma} <= "
                          f"gamma_max={g.gamma_max}")
    head = g.draft == "head" or (Path(g.draft) / "draft_head.json").is_file() if g.draft else False
    if any(b < 1 for b in g.tree):
        raise ConfigError(f"distill.tree={g.tree} must give >= 1 children per depth")
    if g.tree and not head:
        raise ConfigError(f"distill.tree={g.tree} needs a draft head as distill.draft (got {g.draft!r}): draft "
                          "models propose chains")
    if g.tree_nodes < 0 or g.tree_depth < 1 or g.tree_topk < 1:
        raise ConfigError(f"distill.tree_nodes={g.tree_nodes} must be >= 0, distill.tree_depth={g.tree_depth} and "
                          f"distill.tree_topk={g.tree_topk} >= 1")
    if g.tree_value not in ("counted", "head"):
        raise ConfigError(f"distill.tree_value={g.tree_value!r} must be 'counted' or 'head'")
    if g.tree_nodes and (not head or g.tree or not g.greedy):
        why = ("needs a draft head as distill.draft" if not head else "and distill.tree are two trees: choose one"
               if g.tree else "needs distill.greedy=true: a node's top-k children are not the i.i.d. draws sampling's "
               "acceptance rule needs")
        raise ConfigError(f"distill.tree_nodes={g.tree_nodes} {why}")
    if g.tree and (g.adaptive_gamma or g.gamma_by_cost):
        rule = "adaptive_gamma" if g.adaptive_gamma else "gamma_by_cost"
        raise ConfigError(f"distill.{rule}=true with distill.tree is refused: a static tree's size is its shape "
                          "(distill.tree_nodes with distill.gamma_by_cost sizes a dynamic tree by cost)")
    if g.tree_nodes and g.adaptive_gamma:
        raise ConfigError("distill.adaptive_gamma=true with distill.tree_nodes is refused: the rule sizes chains "
                          "(distill.gamma_by_cost sizes a dynamic tree)")
    if g.tree_nodes and g.gamma_by_cost and g.gamma_min > g.tree_nodes:
        raise ConfigError(f"distill.gamma_by_cost with distill.tree_nodes verifies gamma_min..tree_nodes drafts a "
                          f"round: gamma_min={g.gamma_min} > tree_nodes={g.tree_nodes}")
    if g.save_every < 0:
        raise ConfigError(f"distill.save_every={g.save_every} must be >= 0 (0 = only at the end)")
    if g.temperature <= 0 or g.lr <= 0:
        raise ConfigError(f"distill.temperature={g.temperature} and distill.lr={g.lr} must be > 0")
    if not 0.0 < g.beta < 1.0:
        raise ConfigError(f"distill.beta={g.beta} must be in (0, 1)")
    for item in g.synthetic:
        domain, _, count = item.partition(":")
        if not domain or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"distill.synthetic entry {item!r} must be domain:count, e.g. 'stdlib:400'")


def check_fssdp(cfg: JobConfig) -> None:
    f, p = cfg.moe.fssdp, cfg.parallel
    if cfg.moe.placement != "fssdp":
        return
    if p.ep < 2:
        raise ConfigError(f"moe.placement='fssdp' shards experts over the ep group: needs parallel.ep >= 2, "
                          f"got {p.ep}")
    if cfg.diloco.enabled and f.reshard_every:
        raise ConfigError(f"moe.fssdp.reshard_every={f.reshard_every} with diloco.enabled=true is refused: owner "
                          "moves reorder the expert slots that DiLoCo's global copies and outer momentum are kept "
                          "in, and each worker would plan its own; set moe.fssdp.reshard_every=0 (owners fixed, "
                          "replicas still follow each worker's load)")
    if f.window < 1 or f.reshard_every < 0 or f.extra_slots < -1:
        raise ConfigError(f"moe.fssdp.window={f.window} must be >= 1, moe.fssdp.reshard_every={f.reshard_every} "
                          f">= 0 and moe.fssdp.extra_slots={f.extra_slots} >= -1 (-1 = E / ep)")


def draft_head_layers(cfg: JobConfig) -> list[int]:
    """The blocks whose output feeds the draft head: `draft_head.layers`, or EAGLE-3's low, middle and high."""
    n = cfg.model.n_layers
    return list(cfg.draft_head.layers) or [min(max(i, 0), n - 1) for i in (2, n // 2, n - 3)]


def check_draft_head(cfg: JobConfig) -> None:
    h = cfg.draft_head
    if not h.enabled:
        return
    n = cfg.model.n_layers
    if h.layers and (len(h.layers) != 3 or not all(0 <= i < n for i in h.layers)):
        raise ConfigError(f"draft_head.layers={h.layers} must name three blocks (low, middle, high) in "
                          f"[0, model.n_layers={n})")
    if h.decoder_layers < 1 or h.ttt_steps < 1 or h.lr <= 0 or h.warmup_steps < 0 or h.grad_clip < 0:
        raise ConfigError(f"draft_head: decoder_layers={h.decoder_layers} and ttt_steps={h.ttt_steps} must be >= 1, "
                          f"lr={h.lr} > 0, warmup_steps={h.warmup_steps} and grad_clip={h.grad_clip} >= 0")
    if not 0 < h.step_decay <= 1:
        raise ConfigError(f"draft_head.step_decay={h.step_decay} must be in (0, 1]")
    if not 1 <= h.every <= cfg.train.steps:
        raise ConfigError(f"draft_head.every={h.every} must be in [1, train.steps={cfg.train.steps}]: the head "
                          "trains on the steps divisible by it")
    if h.ttt_steps >= cfg.data.seq_len - 1:
        raise ConfigError(f"draft_head.ttt_steps={h.ttt_steps} leaves no position to train at "
                          f"data.seq_len={cfg.data.seq_len}")


def check_diloco(cfg: JobConfig) -> None:
    g = cfg.diloco
    if not g.enabled:
        return
    if g.sync_every < 1 or g.fragments < 1:
        raise ConfigError(f"diloco.sync_every={g.sync_every} and diloco.fragments={g.fragments} must be >= 1")
    if g.sync_every % g.fragments:
        raise ConfigError(f"diloco.fragments={g.fragments} does not divide diloco.sync_every={g.sync_every} "
                          "(fragments sync one every sync_every/fragments steps)")
    if g.fragments > cfg.model.n_layers:
        raise ConfigError(f"diloco.fragments={g.fragments} exceeds model.n_layers={cfg.model.n_layers}")
    if not 0 <= g.overlap < g.sync_every // g.fragments:
        raise ConfigError(f"diloco.overlap={g.overlap} must be in [0, sync_every/fragments="
                          f"{g.sync_every // g.fragments})")
    if not 0.0 <= g.merge_alpha <= 1.0:
        raise ConfigError(f"diloco.merge_alpha={g.merge_alpha} must be in [0, 1]")
    if g.quant_bits not in (0, 4, 8):
        raise ConfigError(f"diloco.quant_bits={g.quant_bits} must be 0 (fp32), 4 or 8")
    if g.quant_block < 2 or g.quant_block % 2:
        raise ConfigError(f"diloco.quant_block={g.quant_block} must be an even number >= 2")
    if g.compress == "topk":
        if g.quant_bits:
            raise ConfigError(f"diloco.compress='topk' sends its own {g.topk_bits}-bit codes (diloco.topk_bits); "
                              f"diloco.quant_bits={g.quant_bits} applies to dense exchanges only: set it to 0")
        if not 0.0 < g.topk_fraction <= 1.0 or not 2 <= g.topk_chunk <= 32768 or g.topk_bits not in (2, 4, 8):
            raise ConfigError(f"diloco.topk_fraction={g.topk_fraction} must be in (0, 1], diloco.topk_chunk="
                              f"{g.topk_chunk} in [2, 32768] and diloco.topk_bits={g.topk_bits} 2, 4 or 8")
        if not 0.0 <= g.error_decay <= 1.0:
            raise ConfigError(f"diloco.error_decay={g.error_decay} must be in [0, 1]")
    elif g.topk_average != "workers":
        raise ConfigError(f"diloco.topk_average={g.topk_average!r} divides top-k sums by their senders; "
                          f"diloco.compress={g.compress!r} sends every value from every worker: use 'topk' or leave it")
    if g.outer_lr <= 0 or not 0.0 <= g.outer_momentum < 1.0:
        raise ConfigError(f"diloco.outer_lr={g.outer_lr} must be > 0 and diloco.outer_momentum="
                          f"{g.outer_momentum} in [0, 1)")
    if g.elastic:
        check_elastic(cfg)
    elif g.secret_file:
        raise ConfigError(f"diloco.secret_file={g.secret_file!r} signs the elastic outer group's records; it needs "
                          "diloco.elastic=true")


def check_elastic(cfg: JobConfig) -> None:
    g = cfg.diloco
    if cfg.parallel.dp_replicate != 1:
        raise ConfigError(f"diloco.elastic runs one worker per job: parallel.dp_replicate={cfg.parallel.dp_replicate} "
                          "must be 1 (start diloco.workers jobs instead)")
    if g.workers < 1 or not 0 <= g.worker < g.workers:
        raise ConfigError(f"diloco.elastic needs diloco.workers >= 1 and diloco.worker in [0, workers); got "
                          f"workers={g.workers}, worker={g.worker}")
    host, _, port = g.store.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"diloco.store={g.store!r} must be host:port (the store `expertmesh diloco-store` serves)")
    if g.timeout_s <= 0 or g.settle_s <= 0:
        raise ConfigError(f"diloco.timeout_s={g.timeout_s} and diloco.settle_s={g.settle_s} must be > 0")
