"""The configuration's schema: one dataclass per section, each field's comment its documentation
(docs/configuration.md is generated from them: `python -m expertmesh.config.reference`)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def suggest(name: str, options: typing.Iterable[str]) -> str:
    """' (did you mean ...?)' for the closest of `options`, or nothing."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
