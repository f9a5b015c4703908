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
    """The transformer: its sizes, attention and rotary embeddings. A Hugging Face checkpoint (`hf_path`) sets
    every architecture key from its config.json."""

    vocab_size: int = 256  # vocabulary (256: the byte tokenizer); set from the tokenizer when `data.tokenizer = "bpe"`
    dim: int = 128  # width: the residual stream's size
    n_layers: int = 4  # depth: transformer blocks
    n_heads: int = 4  # attention heads
    ffn_dim: int = 384  # hidden size of dense (non-MoE) SwiGLU layers
    max_seq_len: int = 512  # RoPE table length
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    # init scale: std of the truncated-normal weights (`init_std / sqrt(2 * n_layers)` for the output projections)
    init_std: float = 0.02
    tie_embeddings: bool = False  # share input and output embeddings
    n_kv_heads: int = 0  # grouped-query attention: key/value heads (0 = `n_heads`)
    head_dim: int = 0  # per-head width (0 = `dim / n_heads`)
    # RMSNorm on q and k: per head (`head`, Qwen3) or over the whole projection (`full`, OLMoE; under `parallel.tp`
    # its squares are summed over the ranks' heads)
    qk_norm: Literal["none", "head", "full"] = "none"
    attn_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    clip_qkv: float = 0.0  # clamp q, k, v to `[-c, c]` after the projections and QK-norm (OLMoE); 0 = off
    # `mla`: DeepSeek's multi-head latent attention, sized by `q_lora_rank`, `kv_lora_rank`, `qk_rope_head_dim`,
    # `qk_nope_head_dim` and `v_head_dim`
    attention: Literal["mha", "mla"] = "mha"
    q_lora_rank: int = 0  # mla: low-rank q projection (0 = a full q projection)
    kv_lora_rank: int = 0  # mla: compressed key/value width
    qk_rope_head_dim: int = 0  # mla: the rotary part of each q/k head (one rotary key shared by all heads)
    qk_nope_head_dim: int = 0  # mla: the part without position
    v_head_dim: int = 0  # mla: value width per head
    # rotary pairs `(2i, 2i+1)`, or `half`: `(i, i + d/2)` as transformers
    rope_style: Literal["interleaved", "half"] = "interleaved"
    # `yarn`: YaRN context extension with `rope_factor`, `rope_original_max_seq_len`, `rope_beta_fast`,
    # `rope_beta_slow`, `rope_mscale` and `rope_mscale_all_dim` (as DeepSeek-V3)
    rope_scaling: Literal["none", "yarn"] = "none"
    rope_factor: float = 1.0  # yarn: context extension factor
    rope_original_max_seq_len: int = 4096  # yarn: the pre-extension context
    # yarn: frequencies above `rope_beta_fast` rotations over the original context are kept as they are
    rope_beta_fast: float = 32.0
    # yarn: frequencies below `rope_beta_slow` rotations are interpolated by `rope_factor` (a linear ramp blends
    # the ones between)
    rope_beta_slow: float = 1.0
    # yarn: the attention factor's mscale (with `rope_mscale_all_dim` set: cos/sin scaled by the ratio of the two)
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0  # yarn: the mscale MLA's softmax scale takes
    # a Hugging Face checkpoint directory: family, every architecture key and the weights come from it
    # (docs/models-and-checkpoints.md)
    hf_path: str = ""


@dataclass(kw_only=True)
class FSSDPConfig:
    """`moe.placement = "fssdp"`: experts sharded over the ep group, hot ones replicated per step."""

    window: int = 5  # w: steps of tokens-per-expert history the placement plan is computed from
    extra_slots: int = -1  # m: replicas a rank may hold per layer; -1 = as many as it owns (`E / ep`)
    # plan on this batch's own counts after the router (one more small all-reduce per layer)
    calibrate: bool = False
    rematerialize: bool = False  # free replicas after a layer's forward, gather them again in its backward
    # R: every R steps move owners (weights and optimizer state) to balance their load (0 = never)
    reshard_every: int = 100


@dataclass(kw_only=True)
class MoEConfig:
    """The mixture-of-experts layers: router, experts, load balancing and where the experts live."""

    num_experts: int = 8  # experts per MoE layer
    top_k: int = 2  # experts per token
    every: int = 1  # layer `i` has a MoE FFN when `(i + 1) % every == 0`, a dense SwiGLU otherwise
    expert_dim: int = 128  # hidden size F of each SwiGLU expert (weights stored `[E, D, F]`)
    shared_experts: int = 0  # a dense shared expert of `shared_experts * expert_dim` that every token passes through
    shared_dim: int = 0  # hidden size of the shared expert when it is not `shared_experts * expert_dim` (Qwen2-MoE)
    shared_gate: bool = False  # the shared expert's output scaled by `sigmoid(x . w)` per token (Qwen2-MoE)
    routed_scaling_factor: float = 1.0  # the routed experts' combine weights are multiplied by it (DeepSeek-V3)
    first_k_dense: int = 0  # the first k layers are dense whatever `every` says (DeepSeek-V3)
    score_func: Literal["softmax", "sigmoid"] = "softmax"  # router scores: `softmax` or `sigmoid`
    norm_topk: bool = True  # renormalise the top-k weights
    aux_loss_coef: float = 0.01  # weight of the Switch load-balance loss
    z_loss_coef: float = 0.001  # weight of the router z-loss
    # 0 = dropless; > 0 keeps `ceil(cf * T * K / E)` slots per expert (per rank's batch), drops the lowest-scored
    # slots beyond capacity and counts them
    capacity_factor: float = 0.0
    # aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for *choosing* experts only,
    # moved by this step against the global load after every optimizer step; 0 = off
    bias_update_rate: float = 0.0
    n_groups: int = 1  # group-limited routing: experts split into `n_groups` groups (1 = off)
    # group-limited routing: each token chooses its experts inside its best `topk_groups` groups (a group's score:
    # the sum of its two best experts)
    topk_groups: int = 1
    # PR-MoE: a dense SwiGLU (hidden `expert_dim`) beside the experts, mixed per token by a learned softmax coefficient
    residual: bool = False
    # expert count of each MoE layer (PR-MoE's pyramid); empty = `num_experts` everywhere
    num_experts_per_layer: list[int] = field(default_factory=list)
    # dispatch/combine: `auto` (Triton kernels on GPU when triton is installed, else the CUDA kernels; C++ on CPU),
    # `cpp`, `cuda`, `reference` (pure torch), `triton` (dispatch, combine and the grouped expert GEMMs in Triton;
    # on a CPU through Triton's interpreter), or `triton_fused` (a local MoE layer's forward in one Triton kernel)
    backend: Literal["auto", "reference", "cpp", "cuda", "triton", "triton_fused"] = "auto"
    # `ep`: experts split evenly over the `parallel.ep` ranks; `fssdp`: fully sharded sparse data parallelism, owner
    # shards over the ep group plus per-step replicas of hot experts (docs/fssdp.md)
    placement: Literal["ep", "fssdp"] = "ep"
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)  # the moe.fssdp section

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
    """The degrees of the device mesh, and how each axis splits the model."""

    dp_replicate: int = 1  # whole-model replicas (DiLoCo workers): the replica degree
    dp: int = -1  # data-parallel degree; -1: whatever WORLD_SIZE leaves after the other degrees
    ep: int = 1  # expert-parallel degree
    tp: int = 1  # tensor-parallel degree
    # FSDP2 (`fully_shard`): weights, gradients and optimizer state sharded over the data-parallel ranks;
    # false: replicated weights, bucketed gradient all-reduce (DDP-style)
    dp_shard: bool = True
    # under `tp`: the residual stream and norms split along the sequence between the parallel regions
    sequence_parallel: bool = True
    vocab_parallel: bool = True  # under `tp`: embedding and output head split over the vocabulary; false: replicated
    activation_checkpoint: Literal["none", "full"] = "none"  # `full`: every block recomputed in backward
    # pipeline stages' ranks: the outermost mesh axis (`torch.distributed.pipelining`; docs/pipeline.md)
    pp: int = 1
    # `1F1B`, `Interleaved1F1B`, `ZBVZeroBubble`, `DualPipeV` (each runs on gloo and NCCL; refused if the
    # installed torch lacks it)
    pp_schedule: str = "1F1B"
    # micro-batches of `data.batch_size` sequences each pipeline runs per step (x `train.grad_accum`);
    # 0 = pp x stages per rank
    pp_microbatches: int = 0
    pp_stages_per_rank: int = 1  # virtual stages per rank: >= 2 for `Interleaved1F1B`, exactly 2 for the V schedules
    # layers per stage (`pp * pp_stages_per_rank` entries), e.g. `[3, 5, 5, 3]`; empty = the contiguous split that
    # minimizes the largest stage's share of parameters + FLOPs (embedding on the first stage, norm and head on
    # the last)
    pp_layout: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class DataConfig:
    """The training text, its tokenizer and its batches."""

    # `stdlib` (the Python standard library's `.py` files, no tests) or `files` (`data.paths`)
    source: Literal["stdlib", "files"] = "stdlib"
    paths: list[str] = field(default_factory=list)  # globs, for `source = "files"` (`.txt`, `.py`, `.jsonl` …)
    jsonl_field: str = "text"  # the field of each `.jsonl` line's record that holds the text
    # `chat`: `.jsonl` lines of `{"messages": [{"role", "content"}, …]}` rendered with the checkpoint's chat
    # template (`tokenizer_config.json` or `chat_template.jinja`; needs `data.tokenizer = "hf"`)
    format: Literal["text", "chat"] = "text"
    # chat: the loss on every token (`all`), or only on the assistant's tokens (`assistant`: their content and
    # end token)
    loss_on: Literal["all", "assistant"] = "all"
    # `byte`; `bpe`: loaded from `tokenizer_path` or trained here on the training split; `hf`: `model.hf_path`'s
    # `tokenizer.json` (or `tokenizer_path`)
    tokenizer: Literal["byte", "bpe", "hf"] = "byte"
    tokenizer_path: str = ""  # a `tokenizers` JSON file; empty: train a BPE on the training split
    bpe_vocab_size: int = 2048  # vocabulary of the BPE trained here (>= 260)
    max_bytes: int = 16_000_000  # corpus cap in characters (0 = everything)
    seq_len: int = 128  # sequence length in tokens
    batch_size: int = 8  # sequences per rank per micro-batch
    eval_fraction: float = 0.02  # the last fraction of the token stream is held out for evaluation


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and a cosine decay."""

    lr: float = 3e-3  # AdamW's peak learning rate
    weight_decay: float = 0.1  # AdamW's weight decay (no decay on norms, biases and other 1-D parameters)
    beta1: float = 0.9  # AdamW's beta1
    beta2: float = 0.95  # AdamW's beta2
    eps: float = 1e-8  # AdamW's epsilon
    warmup_steps: int = 20  # linear warmup, then cosine to `lr * min_lr_ratio`
    min_lr_ratio: float = 0.1  # the cosine ends at `lr * min_lr_ratio`
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables clipping)


@dataclass(kw_only=True)
class TrainConfig:
    """The run: its name and directory, its length, evaluation, device and precision."""

    name: str = "default"  # the run's name: its directory is `run_dir/name`
    run_dir: str = "runs"  # where the run directories are
    steps: int = 500  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 1234  # seed (init and data)
    eval_every: int = 100  # held-out evaluation every N steps (also at step 0 and the last step)
    eval_batches: int = 8  # batches per held-out evaluation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # `auto`: CUDA if present
    # `auto`: bf16 on CUDA, fp32 on CPU. `bf16`: FSDP gathers bf16 weights and reduces fp32 gradients, fp32 master
    # weights and optimizer state, autocast for the rest, bf16 rows through dispatch, the all-to-all and the
    # experts' grouped GEMM. `fp16` is refused (no loss scaler)
    mixed_precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    # `torch.compile` each transformer block's forward (regional, as torchtitan); inductor generates C++ on CPU
    # (needs a C++ compiler), triton on CUDA
    compile: bool = False
    # `aot_eager` traces forward and backward but runs them eagerly, without code generation (debugging; the
    # distributed tests); `eager`: Dynamo's capture only
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    threads: int = 0  # torch threads per process; 0 = cores / local processes


@dataclass(kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints (DCP) in the run directory."""

    enabled: bool = True  # write DCP checkpoints
    every: int = 100  # steps between two checkpoints
    keep: int = 2  # how many complete checkpoints to keep
    resume: bool = True  # resume automatically from the newest intact checkpoint of the run directory
    # after the last step, export the weights to `runs/<name>/hf_export` in the checkpoint's family
    # (needs `model.hf_path`)
    export_hf: bool = False


@dataclass(kw_only=True)
class MetricsConfig:
    """The metrics line, the metrics records and W&B."""

    log_every: int = 10  # one metrics line and record every N steps (and the last step)
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # W&B on rank 0: `offline`, `online` or `disabled`
    wandb_project: str = "expertmesh"  # the W&B project


@dataclass(kw_only=True)
class DiLoCoConfig:
    """Streaming DiLoCo over the `parallel.dp_replicate` workers (expertmesh/dist/diloco.py)."""

    enabled: bool = False  # Streaming DiLoCo over the `parallel.dp_replicate` workers (docs/diloco.md)
    sync_every: int = 50  # H: inner steps between two syncs of the same fragment
    fragments: int = 1  # P: fragments of transformer blocks, synced one every H/P steps
    # `strided`: block i -> fragment i mod P, or `sequential`: contiguous runs of blocks
    pattern: Literal["strided", "sequential"] = "strided"
    # tau: inner steps between starting a fragment's exchange and applying it (0 = synchronous:
    # `theta_local <- theta_global`)
    overlap: int = 0
    merge_alpha: float = 0.5  # with overlap: `theta_local <- alpha * theta_local + (1 - alpha) * theta_global`
    outer_lr: float = 0.7  # the outer SGD's learning rate
    outer_momentum: float = 0.9  # the outer SGD's momentum
    nesterov: bool = True  # the outer SGD's momentum is Nesterov's
    # pseudo-gradients on the wire: 0 = fp32, 8 or 4 = blockwise codes with one fp32 scale per block
    quant_bits: int = 0
    quant_block: int = 64  # values per fp32 scale
    # `dense`: every value of the pseudo-gradients crosses (fp32, or `quant_bits` codes); `topk` (SparseLoCo):
    # per chunk, the largest values of error feedback + pseudo-gradient, the rest kept for the next sync
    compress: Literal["dense", "topk"] = "dense"
    topk_fraction: float = 0.0156  # topk: share of each chunk's values sent (64 of 4096)
    topk_chunk: int = 4096  # topk: values per chunk (one fp32 scale each; offsets sent in ceil(log2(chunk)) bits)
    topk_bits: int = 2  # topk: bits per value sent (2, 4 or 8: a sign and a magnitude level)
    # topk: beta of the error feedback `e <- beta * e + delta` (what was not sent decays by it per sync)
    error_decay: float = 0.95
    # topk: what a value's sum over the workers is divided by: `workers` (the group's size, SparseLoCo's mean) or
    # `senders` (the workers that sent that value: one worker's pick is applied whole, not a quarter of it)
    topk_average: Literal["workers", "senders"] = "workers"
    # MoE: an expert that no token reached on a worker since its fragment's last exchange began sends nothing from
    # that worker; each expert's mean is over the workers that trained it, and one that no worker trained is not
    # sent at all (docs/diloco.md#expert-sparse-exchanges)
    expert_sparse: bool = False
    # Elastic workers: each worker is its own job (`expertmesh run`, any `--nproc`), the workers meet through
    # a TCP store (`expertmesh diloco-store`); a worker that fails is dropped, one that (re)starts joins
    # (docs/diloco.md#elastic-workers)
    elastic: bool = False
    workers: int = 0  # elastic: workers expected (the outer group never grows past it)
    # elastic: this job's worker index in `[0, workers)`; its run dir is `runs/<name>/worker<k>`, its data share k
    # of `workers`
    worker: int = -1
    store: str = ""  # elastic: `host:port` of the store, served by `expertmesh diloco-store`
    # elastic: a peer silent this long on the outer group is dropped; a (re)starting worker waits this long
    # for the others
    timeout_s: float = 60.0
    settle_s: float = 5.0  # elastic: a re-forming group waits this long for the workers still missing
    # elastic: a file holding a secret shared by the workers (>= 16 bytes): store records and leader elections
    # are signed with it (HMAC-SHA256) and a worker without it cannot join. Empty: the store and its network
    # are trusted.
    secret_file: str = ""


@dataclass(kw_only=True)
class DistillConfig:
    """`expertmesh distill`: speculative decoding that keeps distilling its draft online (expertmesh/distill/)."""

    target: str = ""  # an expertmesh run directory (its newest intact checkpoint) or a Hugging Face model directory
    # the same kinds (target and draft must share the vocabulary), or a draft head over the target: "head" (a new
    # one, shaped by `draft_head.*`) or a directory holding one (`runs/<name>/draft_head`)
    draft: str = ""
    # trainer ranks: with N > 1 processes (`--nproc`), ranks `[0, trainers)` train the draft (gradients averaged),
    # the others serve
    trainers: int = 1
    online: bool = True  # distill the draft while serving; false: serve with the draft as loaded (a static draft)
    overlap: bool = True  # trainers update while the servers decode; new weights arrive one exchange later
    gamma: int = 4  # tokens the draft proposes per round
    # a draft head's tree: children per depth (e.g. [3, 2, 1, 1]); empty: a chain of `gamma`
    tree: list[int] = field(default_factory=list)
    # a draft head's dynamic tree (EAGLE-2), greedy only: > 0 drafts this many tokens a round, the most probable
    # under the head of `tree_depth` levels in which the `tree_topk` most probable nodes each grow `tree_topk` children
    tree_nodes: int = 0
    tree_depth: int = 6  # the dynamic tree's levels (its deepest path)
    tree_topk: int = 4  # the dynamic tree's nodes grown per level, and children per grown node
    # what a dynamic tree's candidates are worth: "counted", the chance that the target accepts each, counted
    # from the verifications so far by its rank and probability under the head; "head", the head's probability
    # (EAGLE-2), which a head distilled on the target's whole distribution states below its greedy acceptance
    tree_value: str = "counted"
    adaptive_gamma: bool = False  # grow/shrink gamma within `[gamma_min, gamma_max]` from the recent acceptance
    # choose gamma within `[gamma_min, gamma_max]` each round from the verification costs measured at start (this
    # target, `batch_size` requests, gamma+1 tokens a pass, against the draft's) and the recent acceptance: the
    # gamma with the most expected tokens per second (MoESD: a MoE target's passes cost more per token); with
    # `tree_nodes`, each round verifies the `gamma_min..tree_nodes` most probable nodes that pay the most the same way
    gamma_by_cost: bool = False
    gamma_min: int = 1  # `adaptive_gamma`'s lower bound
    gamma_max: int = 8  # `adaptive_gamma`'s upper bound
    greedy: bool = False  # argmax decoding (accept only the target's argmax); else sampling at `temperature`
    temperature: float = 1.0  # the sampling temperature (when not `greedy`)
    max_new_tokens: int = 64  # tokens generated per request
    batch_size: int = 1  # requests a serving rank decodes together (in lockstep)
    prompts: str = "synthetic"  # "synthetic", "stdin", or a JSONL file of `{"prompt" | "tokens", "domain", "id"}`
    # the synthetic stream: `domain:count` entries, in order; domains `stdlib`, `headers`
    synthetic: list[str] = field(default_factory=lambda: ["stdlib:64"])
    prompt_len: int = 64  # synthetic prompts: tokens cut from the domain's text
    # where the draft learns: `rejected` (the first rejected position), `all` (every drafted position whose
    # context was accepted) or `onpolicy` (every drafted position) (expertmesh/distill/online.py)
    positions: Literal["rejected", "all", "onpolicy"] = "rejected"
    # the loss between the target's p and the draft's q: `fkl` `KL(p || q)`, `rkl` `KL(q || p)`,
    # `jsd` JSD[beta], `tvd` total variation
    divergence: Literal["fkl", "rkl", "jsd", "tvd"] = "fkl"
    beta: float = 0.5  # JSD[beta]: the weight of p in `divergence = "jsd"`
    topk: int = 32  # target probabilities kept per position (the rest spread evenly)
    buffer: int = 4096  # replay buffer size, examples
    update_every: int = 8  # I: requests between draft updates
    update_steps: int = 1  # AdamW steps on the draft per update
    update_batch: int = 16  # examples per optimizer step
    lr: float = 3e-4  # the draft's AdamW learning rate
    window: int = 50  # requests per metrics record
    save_draft: bool = True  # write the distilled draft into `runs/<name>/draft` (at the end and every `save_every`)
    save_every: int = 50  # draft updates between saves (0 = only at the end); a resumed run starts from it


@dataclass(kw_only=True)
class DraftHeadConfig:
    """An EAGLE-style draft head trained inside `expertmesh run` on the target's own features
    (expertmesh/distill/head.py, docs/distillation.md#draft-heads)."""

    enabled: bool = False  # train a draft head beside the target, on the detached features of the same forward
    # the residual stream after these blocks (low, middle, high) feeds the head; empty: EAGLE-3's choice,
    # blocks (2, n_layers // 2, n_layers - 3), each clamped into the model
    layers: list[int] = field(default_factory=list)
    decoder_layers: int = 1  # the head's decoder layers (attention + SwiGLU, the target's widths)
    ttt_steps: int = 3  # training-time test: steps unrolled on the head's own features (1 = no unrolling)
    step_decay: float = 0.8  # the loss of unrolled step j weighs `step_decay ** j`
    # the loss between the target's next-position distribution p and the head's q (as `distill.divergence`)
    divergence: Literal["fkl", "rkl", "jsd", "tvd"] = "fkl"
    lr: float = 1e-3  # the head's AdamW peak learning rate (its own optimizer and schedule)
    warmup_steps: int = 20  # the head's linear warmup, then cosine to `lr * optim.min_lr_ratio`
    grad_clip: float = 1.0  # the head's gradient-norm clip (0 disables)
    # the head trains on the steps divisible by `every` only (their whole batch): its cost falls by this factor,
    # and so do its data and updates (its schedule counts its own steps: train.steps // every)
    every: int = 1


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
    draft_head: DraftHeadConfig = field(default_factory=DraftHeadConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_path(self) -> Path:
        path = Path(self.train.run_dir) / self.train.name
        if self.diloco.enabled and self.diloco.elastic:  # the workers of one run are separate jobs
            return path / f"worker{self.diloco.worker}"
        return path
