"""Pipeline parallelism on `torch.distributed.pipelining`: the stages, their layout, and a schedule run
(the pipelined training step and evaluation are train/pipelined.py's).

The model stays whole and free of parallelism. Each rank builds it on meta and keeps only the blocks of
its stages (a *rank model*: the same Transformer with the other layers deleted, and the embedding or
the head set to None where another stage has them), so parameter names are the full model's and a DCP
checkpoint means the same under any pp. Tensor, expert and data parallelism are applied to the rank
model as without pp (parallel/apply.py), inside the stage: the mesh puts pp outermost, so the dp/ep/tp
groups of a rank are all within its stage. A `StageModule` per stage holds that stage's modules (shared
with the rank model, so the names stay the same) and is what torch's `PipelineStage` runs; under FSDP it
is the stage's root FSDP unit, whose gradient reduction the schedule defers to the last micro-batch.

Layout: stage s of S holds a contiguous run of layers (`parallel.pp_layout`, or the split that minimizes
the largest stage's cost, a cost being its share of the parameters plus its share of the FLOPs, the
embedding counted on the first stage and the norm and head on the last). Rank r holds stages r, r + pp,
... (loop: 1F1B, Interleaved1F1B) or r and 2pp - 1 - r (V: ZBVZeroBubble, DualPipeV), as torch places them.

MoE under pp: each stage's load-balance and z-losses give their gradient from the stage that computed
them (`_AddLossGrad`: identity on the stage's output, whose backward also starts the losses' backward),
scaled as the last stage's loss is, so the losses are the same whatever pp and the micro-batch count.
Their statistics are kept per layer on the rank that holds it; the metrics window reduces them over the
stage's data-parallel ranks and then over pp, two collectives every rank joins.

Legend: M micro-batches per step, b rows per micro-batch, S sequence, D model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import nn

from expertmesh.config import PP_SCHEDULES, ConfigError, JobConfig, pp_microbatches
from expertmesh.data.chat import IGNORE
from expertmesh.layers.loss import token_loss
from expertmesh.models.transformer import Transformer
from expertmesh.moe.layer import MoEStats
from expertmesh.parallel.mesh import Mesh

# ---------------------------------------------------------------------------------------------------------
# Layout


def layer_costs(cfg: JobConfig) -> dict[str, list[float]]:
    """Per layer, and for the embedding and the head: parameters, FLOPs per token (forward, matmuls and
    attention scores) and the parameters a token reaches (active). From the meta model, so exact."""
    with torch.device("meta"):
        model = Transformer(cfg)
    m, e, S = cfg.model, cfg.moe, cfg.data.seq_len
    params, active = [], []
    for block in model.layers.values():
        total = sum(p.numel() for p in block.parameters())
        experts = sum(p.numel() for n, p in block.named_parameters() if ".experts." in n)
        n_exp = block.ffn.num_experts if block.is_moe else 1
        params.append(float(total))
        active.append(total - experts + experts * min(e.top_k, n_exp) / n_exp)
    heads = m.n_heads * (m.head_dim or m.dim // m.n_heads)
    attn = 2 * 2 * S * heads  # scores and weighted values, per token, forward
    flops = [2 * a + attn for a in active]
    emb = float(model.tok_embeddings.weight.numel())
    head = float(model.output.weight.numel() + model.norm.weight.numel())
    return {"params": params, "flops": flops, "active": active, "embedding": [emb, 0.0], "head": [head, 2 * head]}


def stage_layout(cfg: JobConfig) -> list[list[int]]:
    """Layer indices of every stage: `parallel.pp_layout`, or the contiguous split that minimizes the
    largest stage cost (share of parameters + share of FLOPs, embedding on the first stage, head on the last)."""
    p = cfg.parallel
    n_stages, n = p.pp * p.pp_stages_per_rank, cfg.model.n_layers
    if p.pp_layout:
        bounds = [0, *accumulate(p.pp_layout)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(n_stages)]
    c = layer_costs(cfg)
    tot_p = sum(c["params"]) + c["embedding"][0] + c["head"][0]
    tot_f = sum(c["flops"]) + c["embedding"][1] + c["head"][1]
    cost = [pa / tot_p + fl / tot_f for pa, fl in zip(c["params"], c["flops"], strict=True)]
    first = c["embedding"][0] / tot_p + c["embedding"][1] / tot_f
    last = c["head"][0] / tot_p + c["head"][1] / tot_f
    prefix = [0.0, *accumulate(cost)]

    def span(i: int, j: int, s: int) -> float:  # layers i..j-1 as stage s
        return prefix[j] - prefix[i] + (first if s == 0 else 0.0) + (last if s == n_stages - 1 else 0.0)

    # best[s][j]: the least largest cost of stages 0..s holding layers 0..j-1 (each stage >= 1 layer)
    best = [[math.inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    for j in range(1, n + 1):
        best[0][j] = span(0, j, 0)
    for s in range(1, n_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                v = max(best[s - 1][i], span(i, j, s))
                if v < best[s][j] - 1e-12:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [n], n
    for s in range(n_stages - 1, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds = [0, *reversed(bounds)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n_stages)]


def rank_stages(cfg: JobConfig, pp_rank: int) -> list[int]:
    """The stage indices rank `pp_rank` of the pipeline holds, in the order torch's schedules place them."""
    p = cfg.parallel
    _, style = PP_SCHEDULES[p.pp_schedule]
    if style == "v":
        return [pp_rank, 2 * p.pp - 1 - pp_rank]
    return [pp_rank + i * p.pp for i in range(p.pp_stages_per_rank)]


def build_rank_model(cfg: JobConfig, stages: list[int], layout: list[list[int]]) -> Transformer:
    """The full model on meta with only `stages`' layers kept (their names unchanged)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    keep = {str(i) for s in stages for i in layout[s]}
    for key in list(model.layers):
        if key not in keep:
            del model.layers[key]
    if 0 not in stages:
        model.tok_embeddings = None
    if len(layout) - 1 not in stages:
        model.norm = model.output = None
    return model


# ---------------------------------------------------------------------------------------------------------
# Stages


class _AddLossGrad(torch.autograd.Function):
    """Identity on the stage's output; its backward also starts `loss`'s backward with `scale`, so a stage's
    MoE losses give their gradients from the stage that computed them, in the pipeline's backward pass."""

    @staticmethod
    def forward(ctx, h, loss, scale: float):
        ctx.scale, ctx.shape, ctx.dtype = scale, loss.shape, loss.dtype
        return h.clone()  # not a view: the split-backward schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.shape, ctx.scale, dtype=ctx.dtype, device=grad.device), None


class StageModule(nn.Module):
    """One pipeline stage: the embedding (first stage), its blocks, the norm and head (last stage), the
    same module objects as the rank model's and under the same names. Its output is the hidden state
    (in `boundary_dtype`) or, on the last stage, the fp32 logits. Every forward appends its MoE
    statistics to `self.stats` (one list per micro-batch)."""

    def __init__(self, model: Transformer, index: int, layers: list[int], last: bool, cfg: JobConfig,
                 boundary_dtype: torch.dtype) -> None:
        super().__init__()
        self.index = index
        self.tok_embeddings = model.tok_embeddings if index == 0 else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm, self.output = (model.norm, model.output) if last else (None, None)
        object.__setattr__(self, "owner", model)  # its rotary tables, not registered twice
        self.seq_len, self.boundary_dtype = cfg.data.seq_len, boundary_dtype
        self.n_moe = sum(1 for i in range(cfg.model.n_layers) if cfg.moe.is_moe(i))
        self.aux_coef, self.z_coef = cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef
        self.loss_scale = 1.0  # 1 / (micro-batches per step): set by the step
        self.stats: list[list[MoEStats]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        cos, sin = self.owner.rope_cos[: self.seq_len], self.owner.rope_sin[: self.seq_len]
        stats = []
        for block in self.layers.values():
            h, s = block(h, cos, sin)
            if s is not None:
                stats.append(s)
        self.stats.append(stats)
        if self.output is not None:
            h = self.output(self.norm(h)).float()
        else:
            h = h.to(self.boundary_dtype)
        if stats and torch.is_grad_enabled() and (self.aux_coef or self.z_coef):
            loss = (self.aux_coef * torch.stack([s.aux_loss for s in stats]).sum()
                    + self.z_coef * torch.stack([s.z_loss for s in stats]).sum()) / self.n_moe
            h = _AddLossGrad.apply(h, loss, self.loss_scale)
        return h


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them."""

    stages: list[StageModule]  # in stage order
    schedule: object
    group: object  # the pp process group
    microbatches: int
    loss: PipelineLoss
    moe_index: dict[str, int] = field(default_factory=dict)  # layer key -> index among all MoE layers
    experts: list[int] = field(default_factory=list)  # experts of every MoE layer
    v_shaped: bool = False  # ZBVZeroBubble, DualPipeV
    rows: int = 1  # sequences per micro-batch (data.batch_size): the stages' shapes

    @property
    def first(self) -> bool:  # holds stage 0: feeds the tokens
        return self.stages[0].tok_embeddings is not None

    @property
    def last(self) -> bool:  # holds the last stage: computes the loss
        return self.stages[-1].output is not None

    @property
    def owned_moe_layers(self) -> list[int]:
        """Index among all MoE layers of each MoE layer this rank holds, in stage (= layer) order."""
        return [self.moe_index[k] for st in self.stages for k in st.layers if k in self.moe_index]


def stage_modules(model: Transformer, cfg: JobConfig, mesh: Mesh, boundary_dtype: torch.dtype) -> list[StageModule]:
    """The StageModules of this rank, built on the (meta, possibly tp/ep-placed) rank model."""
    layout = stage_layout(cfg)
    pp_rank = mesh.dims.coordinate(dist.get_rank())["pp"]
    last = len(layout) - 1
    return [StageModule(model, s, layout[s], s == last, cfg, boundary_dtype)
            for s in sorted(rank_stages(cfg, pp_rank))]


def schedule_class(cfg: JobConfig):
    """The installed torch's class for `parallel.pp_schedule` (config files outlive installs: a name this torch
    lacks is refused in one line, by the launcher before any rank starts and again where the pipeline is built)."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    name = cfg.parallel.pp_schedule
    try:
        return get_schedule_class(name)
    except ValueError as e:
        raise ConfigError(f"parallel.pp_schedule={name!r} is not a schedule of the installed torch "
                          f"{torch.__version__}: {e}") from e


def build_pipeline(stages: list[StageModule], cfg: JobConfig, mesh: Mesh, device: torch.device) -> Pipeline:
    """torch's PipelineStage per StageModule, with the shapes given (no inference pass), and the schedule."""
    from torch.distributed.pipelining import PipelineStage

    p, m = cfg.parallel, cfg.model
    n_stages, M = p.pp * p.pp_stages_per_rank, pp_microbatches(p)
    b, S = cfg.data.batch_size, cfg.data.seq_len
    local_S = S // p.tp if p.tp > 1 and p.sequence_parallel else S
    group = mesh.group("pp")
    torch_stages = []
    for st in stages:
        hidden = torch.empty(b, local_S, m.dim, dtype=st.boundary_dtype, device="meta", requires_grad=True)
        inputs = torch.empty(b, S, dtype=torch.long, device="meta") if st.index == 0 else hidden
        outputs = torch.empty(b, S, m.vocab_size, device="meta") if st.output is not None else hidden
        torch_stages.append(PipelineStage(st, st.index, n_stages, device, input_args=inputs, output_args=outputs,
                                          group=group))
    cls = schedule_class(cfg)
    loss = PipelineLoss()
    multi = PP_SCHEDULES[p.pp_schedule][0] != 1
    schedule = cls(torch_stages if multi else torch_stages[0], n_microbatches=M, loss_fn=loss, scale_grads=False)
    moe = [i for i in range(m.n_layers) if cfg.moe.is_moe(i)]
    return Pipeline(stages, schedule, group, M, loss, {str(i): n for n, i in enumerate(moe)},
                    cfg.moe.experts_in_layers(m.n_layers), PP_SCHEDULES[p.pp_schedule][1] == "v", b)


class PipelineLoss:
    """The last stage's loss per micro-batch: the token mean scaled by 1 / (micro-batches per step)
    (training), or the token sum (evaluation); it keeps the unscaled values for the metrics."""

    def __init__(self) -> None:
        self.scale, self.sum = 1.0, False
        self.values: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = token_loss(logits, y, "sum")
        count = (y != IGNORE).sum()
        self.counts.append(count)
        if self.sum:
            self.values.append(total.detach())
            return total
        mean = total / count.clamp_min(1)
        self.values.append(mean.detach())
        return mean * self.scale


def run_schedule(pipe: Pipeline, x: torch.Tensor, y: torch.Tensor, autocast) -> None:
    """One schedule run: the first stage's rank feeds `x`, the last stage's rank gives `y` and gets the losses."""
    for st in pipe.stages:
        st.stats = []
    pipe.loss.values, pipe.loss.counts = [], []
    args = (x,) if pipe.first else ()
    kwargs = {"target": y, "losses": []} if pipe.last else {}
    with autocast:
        if torch.is_grad_enabled():
            pipe.schedule.step(*args, **kwargs)
        elif pipe.v_shaped:
            # torch's V schedules cannot run forward only (their eval raises "can't steal_bwd_input if this
            # stage doesn't have backward"): a full step, whose gradients the next step's zero_grad drops
            with torch.enable_grad():
                pipe.schedule.step(*args, **kwargs)
        else:
            pipe.schedule.eval(*args, **kwargs)


def per_micro(pipe: Pipeline, M: int) -> list[list[MoEStats]]:
    """Per micro-batch, the MoE statistics of every layer this rank holds, in layer order."""
    for st in pipe.stages:
        if len(st.stats) != M:
            raise RuntimeError(f"stage {st.index} ran {len(st.stats)} forwards for {M} micro-batches")
    return [[s for st in pipe.stages for s in st.stats[i]] for i in range(M)]
