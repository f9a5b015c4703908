"""Job configuration: a dataclass tree, loaded from TOML, overridden by dotted CLI keys.

Precedence is CLI > file > dataclass defaults. The defaults *are* the default run
(`configs/default.toml` spells them out; a test keeps the two equal). Every check that
can be made without a process group is made here, before any rank starts, and every
error names the key and the numbers involved.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config problem, reported to the user as one line."""


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 256  # byte tokenizer; set from the BPE tokenizer when data.tokenizer = "bpe"
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 384  # hidden size of dense (non-MoE) SwiGLU layers
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    # Attention. A Hugging Face checkpoint (`hf_path`) sets all of these from its config.json.
    n_kv_heads: int = 0  # grouped-query attention: key/value heads (0 = n_heads)
    head_dim: int = 0  # per-head width (0 = dim / n_heads)
    qk_norm: Literal["none", "head", "full"] = "none"  # RMSNorm on q, k: per head (Qwen3) or whole projection (OLMoE)
    attn_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    clip_qkv: float = 0.0  # clamp q, k, v to [-c, c] after the projections and QK-norm (OLMoE); 0 = off
    attention: Literal["mha", "mla"] = "mha"  # mla: DeepSeek's multi-head latent attention (the keys below)
    q_lora_rank: int = 0  # mla: low-rank q projection (0 = a full q projection)
    kv_lora_rank: int = 0  # mla: compressed key/value width
    qk_rope_head_dim: int = 0  # mla: the rotary part of each q/k head (one rotary key shared by all heads)
    qk_nope_head_dim: int = 0  # mla: the part without position
    v_head_dim: int = 0  # mla: value width per head
    rope_style: Literal["interleaved", "half"] = "interleaved"  # pairs (2i, 2i+1), or (i, i + d/2) as transformers
    rope_scaling: Literal["none", "yarn"] = "none"
    rope_factor: float = 1.0  # yarn: context extension factor
    rope_original_max_seq_len: int = 4096  # yarn: the pre-extension context
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    hf_path: str = ""  # a Hugging Face checkpoint directory: family, sizes and weights come from it


@dataclass(kw_only=True)
class FSSDPConfig:
    """moe.placement = "fssdp": experts sharded over the ep group, hot ones replicated per step."""

    window: int = 5  # w: steps of tokens-per-expert history the placement plan is computed from
    extra_slots: int = -1  # m: replicas a rank may hold per layer; -1 = as many as it owns (E / ep)
    calibrate: bool = False  # plan on this batch's counts after the router (one more small all-reduce)
    rematerialize: bool = False  # free replicas after forward, gather them again in backward
    reshard_every: int = 100  # R: move owners to balance their load every R steps (0 = never)


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    every: int = 1  # layer i has a MoE FFN when (i + 1) % every == 0
    expert_dim: int = 128  # hidden size F of each SwiGLU expert
    shared_experts: int = 0  # dense experts every token passes through, F = shared_experts * expert_dim
    shared_dim: int = 0  # hidden size of the shared expert when it is not shared_experts * expert_dim (Qwen2-MoE)
    shared_gate: bool = False  # the shared expert's output scaled by sigmoid(x . w) per token (Qwen2-MoE)
    routed_scaling_factor: float = 1.0  # the routed experts' combine weights are multiplied by it (DeepSeek-V3)
    first_k_dense: int = 0  # the first k layers are dense whatever `every` says (DeepSeek-V3)
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    capacity_factor: float = 0.0  # 0 = dropless; > 0 drops the lowest-scored slots beyond capacity
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3): per-expert selection bias step; 0 = off
    n_groups: int = 1  # group-limited routing: experts split into n_groups groups ...
    topk_groups: int = 1  # ... and each token chooses its experts inside its best topk_groups groups
    residual: bool = False  # PR-MoE: a dense MLP beside the experts, mixed by a learned per-token coefficient
    num_experts_per_layer: list[int] = field(default_factory=list)  # per MoE layer; empty = num_experts everywhere
    backend: Literal["auto", "reference", "cpp", "cuda"] = "auto"
    placement: Literal["ep", "fssdp"] = "ep"  # fssdp: fully sharded sparse data parallelism over the ep group
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense and (layer + 1) % self.every == 0

    def experts_in_layers(self, n_layers: int) -> list[int]:
        """Expert count of each MoE layer, in order."""
        moe_layers = sum(1 for i in range(n_layers) if self.is_moe(i))
        return list(self.num_experts_per_layer) or [self.num_experts] * moe_layers

    @property
    def shared_hidden(self) -> int:
        return self.shared_dim or self.shared_experts * self.expert_dim


@dataclass(kw_only=True)
class ParallelConfig:
    dp_replicate: int = 1  # whole-model replicas (DiLoCo workers)
    dp: int = -1  # -1: whatever WORLD_SIZE leaves after the other degrees
    ep: int = 1
    tp: int = 1
    dp_shard: bool = True  # FSDP2: params, grads, optimizer state sharded over data-parallel ranks; false: replicated
    sequence_parallel: bool = True  # under tp: norms and residual stream split along the sequence
    vocab_parallel: bool = True  # under tp: embedding and output head split over the vocabulary; false: replicated
    activation_checkpoint: Literal["none", "full"] = "none"  # full: recompute every block in backward
    pp: int = 1  # pipeline stages' ranks: the outermost mesh axis (torch.distributed.pipelining)
    pp_schedule: str = "1F1B"  # 1F1B, Interleaved1F1B, ZBVZeroBubble, DualPipeV (as the installed torch has them)
    pp_microbatches: int = 0  # micro-batches of data.batch_size a pipeline runs per step; 0: pp * stages_per_rank
    pp_stages_per_rank: int = 1  # virtual stages per rank: >= 2 for Interleaved1F1B, exactly 2 for the V schedules
    pp_layout: list[int] = field(default_factory=list)  # layers per stage (pp * stages_per_rank entries); empty: auto


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["stdlib", "files"] = "stdlib"
    paths: list[str] = field(default_factory=list)  # globs, for source = "files" (.txt, .py, .jsonl …)
    jsonl_field: str = "text"
    format: Literal["text", "chat"] = "text"  # chat: .jsonl lines of {"messages": [...]}, rendered by the chat template
    loss_on: Literal["all", "assistant"] = "all"  # chat: the loss on every token, or on the assistant's only
    tokenizer: Literal["byte", "bpe", "hf"] = "byte"  # hf: model.hf_path's tokenizer.json (or tokenizer_path)
    tokenizer_path: str = ""  # a tokenizers JSON file; empty: train a BPE on the training split
    bpe_vocab_size: int = 2048
    max_bytes: int = 16_000_000  # corpus cap (0 = everything)
    seq_len: int = 128
    batch_size: int = 8  # sequences per rank per micro-batch
    eval_fraction: float = 0.02


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass(kw_only=True)
class TrainConfig:
    name: str = "default"
    run_dir: str = "runs"
    steps: int = 500
    grad_accum: int = 1
    seed: int = 1234
    eval_every: int = 100
    eval_batches: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile each transformer block (regional); inductor's C++ backend on CPU
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # aot_eager: trace, no codegen
    threads: int = 0  # torch threads per process; 0 = cores / local processes


@dataclass(kw_only=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 100
    keep: int = 2
    resume: bool = True
    export_hf: bool = False  # at the end of training, export the weights to runs/<name>/hf_export (needs model.hf_path)


@dataclass(kw_only=True)
class MetricsConfig:
    log_every: int = 10
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "expertmesh"


@dataclass(kw_only=True)
class DiLoCoConfig:
    """Streaming DiLoCo over the `parallel.dp_replicate` workers (expertmesh/dist/diloco.py)."""

    enabled: bool = False
    sync_every: int = 50  # H: inner steps between two syncs of the same fragment
    fragments: int = 1  # P: fragments of transformer blocks, synced one every H/P steps
    pattern: Literal["strided", "sequential"] = "strided"  # block i -> fragment i mod P, or contiguous runs
    overlap: int = 0  # tau: inner steps between starting a fragment's exchange and applying it (0 = synchronous)
    merge_alpha: float = 0.5  # with overlap: theta_local <- alpha * theta_local + (1 - alpha) * theta_global
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    quant_bits: int = 0  # pseudo-gradients on the wire: 0 = fp32, 8 or 4 = blockwise codes
    quant_block: int = 64  # values per fp32 scale
    # Elastic workers: each worker is its own job (`expertmesh run`, any --nproc), the workers meet through
    # a TCP store (`expertmesh diloco-store`); a worker that fails is dropped, one that (re)starts joins.
    elastic: bool = False
    workers: int = 0  # workers expected (the outer group never grows past it)
    worker: int = -1  # this job's worker index in [0, workers); its run dir is runs/<name>/worker<k>
    store: str = ""  # host:port of the store
    timeout_s: float = 60.0  # a peer silent this long on the outer group is dropped; a joiner waits this long
    settle_s: float = 5.0  # a re-forming group waits this long for the workers still missing
    # A file holding a secret shared by the workers (>= 16 bytes): store records and leader elections are signed
    # with it (HMAC-SHA256) and a worker without it cannot join. Empty: the store and its network are trusted.
    secret_file: str = ""


@dataclass(kw_only=True)
class DistillConfig:
    """`expertmesh distill`: speculative decoding that keeps distilling its draft online (expertmesh/distill/)."""

    target: str = ""  # an expertmesh run directory (its newest intact checkpoint) or a Hugging Face model directory
    draft: str = ""  # the same kinds; target and draft must share the vocabulary
    trainers: int = 1  # with N > 1 processes: ranks [0, trainers) train the draft, the others serve
    online: bool = True  # false: serve with the draft as loaded (the static baseline)
    overlap: bool = True  # trainers update while the servers decode; new weights arrive one exchange later
    gamma: int = 4  # tokens the draft proposes per round
    adaptive_gamma: bool = False  # grow/shrink gamma within [gamma_min, gamma_max] from the recent acceptance
    gamma_min: int = 1
    gamma_max: int = 8
    greedy: bool = False  # argmax decoding (accept only the target's argmax); else sampling at `temperature`
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 1  # requests a serving rank decodes together (in lockstep)
    prompts: str = "synthetic"  # "synthetic", "stdin", or a JSONL file of {"prompt" | "tokens", "domain", "id"}
    synthetic: list[str] = field(default_factory=lambda: ["stdlib:64"])  # domain:count in order; stdlib, headers
    prompt_len: int = 64  # synthetic prompts: tokens cut from the domain's text
    positions: Literal["rejected", "all", "onpolicy"] = "rejected"  # where the draft learns (see online.py)
    divergence: Literal["fkl", "rkl", "jsd", "tvd"] = "fkl"
    beta: float = 0.5  # JSD[beta]
    topk: int = 32  # target probabilities kept per position (the rest spread evenly)
    buffer: int = 4096  # replay buffer, examples
    update_every: int = 8  # I: requests between draft updates
    update_steps: int = 1  # optimizer steps per update
    update_batch: int = 16  # examples per optimizer step
    lr: float = 3e-4
    window: int = 50  # requests per metrics record
    save_draft: bool = True  # write the distilled draft into runs/<name>/draft (at the end and every save_every)
    save_every: int = 50  # draft updates between saves (0 = only at the end); a resumed run starts from it


@dataclass(kw_only=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_path(self) -> Path:
        path = Path(self.train.run_dir) / self.train.name
        if self.diloco.enabled and self.diloco.elastic:  # the workers of one run are separate jobs
            return path / f"worker{self.diloco.worker}"
        return path


# ---------------------------------------------------------------------------------------
# Loading


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_value(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, types.GenericAlias) or typ is list or origin is list:
        (inner,) = typing.get_args(typ) or (Any,)
        if isinstance(value, str):  # a single glob from the CLI
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{where}'{_suggest(key, names)}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section; got {type(value).__name__} {value!r}")
            kwargs[key] = _build(typ, value, f"{where}.")
        else:
            kwargs[key] = _check_value(where, value, typ)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A CLI value is read as a TOML value (`3`, `1e-3`, `true`, `["a", "b"]`); else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override key '{dotted}' must be section.key (e.g. train.steps=50)")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return data


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> JobConfig:
    """Reads the TOML file (if any), applies overrides, returns a checked JobConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    data = apply_overrides(data, overrides)
    cfg = _build(JobConfig, data, "")
    if cfg.model.hf_path:  # the checkpoint decides the architecture; contradicting keys are refused
        from expertmesh.models.hf import resolve

        cfg = resolve(cfg, data)
    check(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> JobConfig:
    cfg = _build(JobConfig, data, "")
    check(cfg)
    return cfg


def save(cfg: JobConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------
# Validation that needs no world size


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
    check_combinations(cfg)


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
                          + _suggest(p.pp_schedule, PP_SCHEDULES))
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
    try:
        from torch.distributed.pipelining import schedules

        schedules.get_schedule_class(p.pp_schedule)
    except (ImportError, ValueError) as e:
        import torch

        raise ConfigError(f"parallel.pp_schedule={p.pp_schedule!r} is not a schedule of the installed torch "
                          f"{torch.__version__}: {e}") from e
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
    if g.adaptive_gamma and not g.gamma_min <= g.gamma <= g.gamma_max:
        raise ConfigError(f"distill.adaptive_gamma needs gamma_min={g.gamma_min} <= gamma={g.gamma} <= "
                          f"gamma_max={g.gamma_max}")
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
    if g.outer_lr <= 0 or not 0.0 <= g.outer_momentum < 1.0:
        raise ConfigError(f"diloco.outer_lr={g.outer_lr} must be > 0 and diloco.outer_momentum="
                          f"{g.outer_momentum} in [0, 1)")
    if g.elastic:
        check_elastic(cfg)
    elif g.secret_file:
        raise ConfigError(f"diloco.secret_file={g.secret_file!r} signs the elastic outer group's records; it needs "
                          "diloco.elastic=true")


# ---------------------------------------------------------------------------------------
# Which features combine: the compatibility matrix (the README's table is generated from it and
# tests/combinations.py proves every pair not refused here against a reference)


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
    "ac": ('parallel.activation_checkpoint="full"', lambda c, w: c.parallel.activation_checkpoint != "none"),
    "capacity": ("moe.capacity_factor > 0", lambda c, w: c.moe.capacity_factor > 0),
    "bias": ("moe.bias_update_rate > 0", lambda c, w: c.moe.bias_update_rate > 0),
    "pr-moe": ("moe.residual=true", lambda c, w: c.moe.residual),
    "shared": ("moe.shared_experts / shared_dim", lambda c, w: c.moe.shared_hidden > 0),
    "accum": ("train.grad_accum > 1", lambda c, w: c.train.grad_accum > 1),
    "bf16": ('train.mixed_precision="bf16"', lambda c, w: c.train.mixed_precision == "bf16"),
    "compile": ("train.compile=true", lambda c, w: c.train.compile),
}

# Pairs refused at config time, with the reason (one line names both keys).
REFUSED: dict[frozenset[str], str] = {
    frozenset({"tp", "compile"}): "a compiled block's backward hands tensor parallelism's redistribution a plain "
                                  "tensor where it needs a DTensor (torch 2.13); run tp blocks eagerly",
}


def features_of(cfg: JobConfig, world: int | None = None) -> set[str]:
    return {name for name, (_, on) in FEATURES.items() if on(cfg, world)}


def check_combinations(cfg: JobConfig, world: int | None = None) -> None:
    on = features_of(cfg, world)
    for pair, why in REFUSED.items():
        if pair <= on:
            a, b = sorted(pair, key=list(FEATURES).index)
            raise ConfigError(f"{FEATURES[a][0]} with {FEATURES[b][0]} is refused: {why}")


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

