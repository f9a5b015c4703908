"""The training job, one process per rank.

    torchrun --nproc_per_node 4 -m expertmesh.launch.train --config configs/default.toml train.steps=50

Reads the config, joins the process group, builds the mesh, data, model and optimizer, resumes
from the newest intact checkpoint, and runs a plain loop: forward, backward, gradient average,
clip, step; eval, log and checkpoint on schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from expertmesh import config as config_mod
from expertmesh.config import ConfigError, JobConfig
from expertmesh.data.chat import IGNORE, load_chat
from expertmesh.data.corpus import glob_files, load_text
from expertmesh.data.loader import TokenLoader, eval_batches, split_tokens
from expertmesh.data.tokenizer import BPETokenizer, ByteTokenizer
from expertmesh.dist.checkpoint import Checkpointer, CheckpointError, latest_intact, rng_state, set_rng_state
from expertmesh.dist.comm_stats import CollectiveTap, Comm, view_labels
from expertmesh.dist.diloco import DiLoCo, replica_group
from expertmesh.dist.elastic import Membership
from expertmesh.dist.fssdp import FSSDP
from expertmesh.launch.env import DistEnv, control_group, detect, init_distributed, pick_device, set_threads
from expertmesh.metrics import Metrics
from expertmesh.models.hf.export import SOURCE_COPY, copy_source_files, export_run
from expertmesh.models.transformer import Transformer, count_params, moe_layers
from expertmesh.moe import ops as moe_ops
from expertmesh.parallel.apply import compute_dtype, parallelize_model
from expertmesh.parallel.data_parallel import clip_grad_norm
from expertmesh.parallel.mesh import Mesh, ParallelDims

log = logging.getLogger("expertmesh")


def build_tokenizer(cfg: JobConfig, text: str, env: DistEnv, comm: Comm):
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.data.tokenizer == "hf":
        tok = BPETokenizer.load(cfg.data.tokenizer_path or Path(cfg.model.hf_path) / "tokenizer.json")
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens, more than model.vocab_size="
                              f"{cfg.model.vocab_size}")
        return tok
    if cfg.data.tokenizer_path:
        return BPETokenizer.load(cfg.data.tokenizer_path)
    path = cfg.run_path / "tokenizer.json"
    if env.is_rank0 and not path.is_file():  # one rank trains, the others wait and load the same file
        train_text = text[: int(len(text) * (1 - cfg.data.eval_fraction))]  # never the held-out part
        BPETokenizer.train(train_text, cfg.data.bpe_vocab_size, path)
    comm.barrier()
    return BPETokenizer.load(path)


def load_data(cfg: JobConfig, env: DistEnv, comm: Comm):
    """(tokenizer, tokens, labels or None): the text corpus, or chat conversations with their labels."""
    if cfg.data.format == "chat":
        tokenizer = build_tokenizer(cfg, "", env, comm)
        template_dir = Path(cfg.data.tokenizer_path).parent if cfg.data.tokenizer_path else Path(cfg.model.hf_path)
        return (tokenizer, *load_chat(cfg.data, glob_files(cfg.data.paths), tokenizer, template_dir))
    text = load_text(cfg.data)
    tokenizer = build_tokenizer(cfg, text, env, comm)
    return tokenizer, tokenizer.encode(text), None


def token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the positions that carry a loss (chat data marks the others IGNORE)."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return total if reduction == "sum" else total / (y != IGNORE).sum().clamp_min(1)


def build_optimizer(model: torch.nn.Module, cfg: JobConfig):
    o = cfg.optim
    groups = []
    for distributed in (False, True):  # foreach kernels take DTensors and plain tensors in separate groups
        params = [p for p in model.parameters() if isinstance(p, DTensor) == distributed]
        decay = [p for p in params if p.ndim >= 2]  # matrices decay; norms do not
        no_decay = [p for p in params if p.ndim < 2]
        groups += [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        progress = min((step - o.warmup_steps) / max(cfg.train.steps - o.warmup_steps, 1), 1.0)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def moe_losses(stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean load-balance and z-loss over the MoE layers (zero for a model without any)."""
    if not stats:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack([s.aux_loss for s in stats]).mean(), torch.stack([s.z_loss for s in stats]).mean()


@torch.no_grad()
def evaluate(model, eval_data, cfg: JobConfig, mesh: Mesh, comm: Comm, device, autocast, diloco=None) -> float:
    """Held-out loss; under DiLoCo, of the global model (every fragment's global copy)."""
    with comm.pause(), (diloco.global_weights() if diloco is not None else nullcontext()):
        loss = _evaluate(model, eval_data, cfg, mesh, comm, device, autocast)
    # FSDP keeps the root's weights gathered after a forward without backward; under DiLoCo they are the
    # global copies just swapped out again. Freed here, the next forward gathers the local weights.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return loss


def _evaluate(model, eval_data, cfg: JobConfig, mesh: Mesh, comm: Comm, device, autocast) -> float:
    model.eval()
    d = mesh.dims
    rank = dist.get_rank() if dist.is_initialized() else 0
    total = torch.zeros(2, dtype=torch.float64, device=device)
    world = d.data_world // d.dp_replicate if d.independent_replicas else d.data_world  # DiLoCo: one worker
    eval_tokens, eval_labels = eval_data
    for x, y in eval_batches(eval_tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.train.eval_batches,
                             d.data_rank(rank) % world, world, d.data_world, eval_labels):
        with autocast:
            logits, _ = model(x.to(device))
        total[0] += token_loss(logits, y.to(device), "sum")
        total[1] += (y != IGNORE).sum()
    comm.all_reduce(total, mesh.group("dense_dp"), "metrics")
    model.train()
    loss, count = total.tolist()
    return loss / max(count, 1)


def check_device_support(cfg: JobConfig, device: torch.device, env: DistEnv) -> None:
    """What the config asks of the device, refused in one line when the device cannot honour it."""
    t = cfg.train
    if t.compile and device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++")):
        raise ConfigError("train.compile=true on CPU needs a C++ compiler for inductor; none on PATH (set CXX, "
                          "or train.compile=false)")
    if t.compile and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("train.compile=true on CUDA needs triton, which is not installed (or train.compile=false)")
    if device.type == "cuda" and compute_dtype(cfg, device) and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.mixed_precision={t.mixed_precision!r} means bf16, which "
                          f"{torch.cuda.get_device_name()} does not support; use 'fp32'")
    b = cfg.moe.backend
    if b == "cuda" and (device.type != "cuda" or not moe_ops.cuda_ops_available()):
        raise ConfigError("moe.backend='cuda' but " + ("the job runs on the CPU" if device.type != "cuda" else
                          "expertmesh._C was built without CUDA kernels (rebuild on a machine with nvcc, or "
                          "moe.backend='auto')"))
    if b == "auto" and device.type == "cuda" and not moe_ops.cuda_ops_available() and env.is_rank0:
        log.warning("moe.backend='auto': expertmesh._C has no CUDA kernels, so dispatch and combine run the "
                    "pure-torch reference on the GPU (rebuild with nvcc for the fused kernels)")


def run(cfg: JobConfig, env: DistEnv) -> dict:
    """Trains per the config; returns the last metrics record (rank 0) or {}."""
    device = pick_device(cfg.train.device, env)
    check_device_support(cfg, device, env)
    dims = ParallelDims.from_config(cfg.parallel, env.world_size, independent_replicas=cfg.diloco.enabled)
    init_distributed(env, device)
    set_threads(cfg.train.threads, env)
    mesh = dims.build_mesh(device.type)
    comm = Comm()
    run_path = cfg.run_path

    # Data: the same tokens on every rank, split once, sharded by data-parallel rank.
    tokenizer, tokens, labels = load_data(cfg, env, comm)
    if tokenizer.vocab_size != cfg.model.vocab_size and cfg.data.tokenizer == "bpe":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    train_tokens, eval_tokens = split_tokens(tokens, cfg.data.eval_fraction)
    train_labels, eval_labels = split_tokens(labels, cfg.data.eval_fraction) if labels is not None else (None, None)
    eval_data = (eval_tokens, eval_labels)
    shard, shards = dims.data_rank(env.rank), dims.data_world
    if cfg.diloco.enabled and cfg.diloco.elastic:  # worker k of the separate jobs reads its own k-th share
        shard, shards = cfg.diloco.worker * shards + shard, cfg.diloco.workers * shards
    loader = TokenLoader(train_tokens, cfg.data.seq_len, cfg.data.batch_size, shard, shards, cfg.train.seed,
                         cfg.train.grad_accum, train_labels)

    # Model: built on meta, then placed, materialized and initialized from outside.
    with torch.device("meta"):
        model = Transformer(cfg)
    par = parallelize_model(model, mesh, cfg, device, comm)
    model = par.model
    optimizer, scheduler = build_optimizer(model, cfg)
    dtype = compute_dtype(cfg, device)  # bf16: FSDP gathers bf16 weights, autocast covers the rest
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    fssdp = None
    if cfg.moe.placement == "fssdp":  # the config check guarantees ep >= 2
        fssdp = FSSDP(moe_layers(model), cfg.moe.fssdp, mesh.group("dense_dp"), comm)
    diloco_group = replica_group(dims) if cfg.diloco.enabled else None
    diloco = make_diloco(model, cfg, diloco_group, comm, env)
    checkpointer = Checkpointer(run_path, cfg.checkpoint.keep, env.rank, comm)
    start_step = 0
    if cfg.checkpoint.enabled and cfg.checkpoint.resume and (path := latest_intact(run_path, comm)) is not None:
        start_step, shared, per_rank = checkpointer.load(path, model, optimizer, scheduler,
                                                         {"loader": loader.state_dict()}, layout_name(cfg, dims))
        set_rng_state(per_rank, device)
        if fssdp is not None and "fssdp" in per_rank:  # else: expert-ordered owners, no history yet
            fssdp.load_state_dict(per_rank["fssdp"], optimizer)
        if diloco is not None and "diloco" in per_rank:
            diloco.load_state_dict(per_rank["diloco"], optimizer)
        elif diloco is not None:
            log.warning("the checkpoint has no DiLoCo state for this layout: global copies restart from the "
                        "loaded weights")
            diloco = make_diloco(model, cfg, diloco_group, comm, env)
        saved_batch, batch = shared["loader"]["global_batch"], loader.state_dict()["global_batch"]
        if saved_batch != batch:
            log.warning("the global batch changed from %d to %d sequences: the data order differs from the "
                        "original run's from here on", saved_batch, batch)
        loader.load_state_dict(shared["loader"])
        log.info("resumed from %s (step %d)", path, start_step)
        if start_step >= cfg.train.steps:  # a success here would hide a reused name or a forgotten steps
            raise ConfigError(f"{run_path} is already at step {start_step} >= train.steps={cfg.train.steps}: "
                              "nothing to train; use another train.name or raise train.steps")
    if diloco is not None:
        joined_at = diloco.start(start_step)  # elastic: waits for the outer group; may take a peer's step
        if joined_at != start_step:
            fast_forward(joined_at, loader, scheduler, cfg)
            start_step = joined_at
    if env.is_rank0:
        config_mod.save(cfg, run_path / "config.json")
        if cfg.model.hf_path:  # what an export needs beside the weights, even if the source moves later
            copy_source_files(Path(cfg.model.hf_path), run_path / SOURCE_COPY)
        n = count_params(model)
        log.info("model: %.2fM parameters (%.2fM in experts); world %d, mesh %s, run dir %s",
                 n["total"] / 1e6, n["expert"] / 1e6, env.world_size, dims.active_axes or "(single)", run_path)
    metrics = Metrics(cfg, run_path, env.is_rank0)
    try:
        rec = train_loop(cfg, env, mesh, comm, par, optimizer, scheduler, loader, eval_data, checkpointer, metrics,
                         start_step, device, autocast, diloco, fssdp)
    finally:
        metrics.close()  # also on a failing peer or SIGTERM: W&B flushes what it was given
    last = run_path / f"step-{cfg.train.steps}"
    if cfg.checkpoint.export_hf and env.is_rank0 and last.is_dir():
        out = run_path / "hf_export"
        shutil.rmtree(out, ignore_errors=True)
        export_run(run_path, out, cfg.train.steps)
        log.info("exported step %d to %s", cfg.train.steps, out)
    return rec


def train_loop(cfg, env, mesh, comm, par, optimizer, scheduler, loader, eval_data, checkpointer, metrics,
               start_step, device, autocast, diloco=None, fssdp=None) -> dict:
    model = par.model
    preemption = Preemption(control_group(device))
    eval_loss = None
    if start_step == 0:
        eval_loss = evaluate(model, eval_data, cfg, mesh, comm, device, autocast, diloco)
        metrics.log_eval(0, eval_loss)
    tap = CollectiveTap(comm, view_labels(mesh.views))  # FSDP's and DTensor's own collectives
    window = Window(mesh, comm, tap, device)
    layout = layout_name(cfg, mesh.dims)
    rec: dict = {}
    step = start_step
    while step < cfg.train.steps:
        step += 1
        t0 = time.perf_counter()
        if fssdp is not None:
            fssdp.begin_step(step, optimizer)
        with tap if window.steps == 0 else nullcontext():  # one sampled step per metrics window
            grad_norm = train_step(cfg, model, par, optimizer, loader, window, mesh, comm, device, autocast, fssdp)
        tap.steps += window.steps == 0
        scheduler.step()
        if diloco is not None and (at := diloco.after_step(step)) != step:  # elastic: took a peer's state
            fast_forward(at, loader, scheduler, cfg)
            step = at
        window.add_step(time.perf_counter() - t0)

        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            if step == cfg.train.steps and diloco is not None:
                diloco.finish()  # the last exchanges land before the final evaluation
            eval_loss = evaluate(model, eval_data, cfg, mesh, comm, device, autocast, diloco)
            metrics.log_eval(step, eval_loss)
        if step % cfg.metrics.log_every == 0 or step == cfg.train.steps:
            rec = window.record(step, scheduler.get_last_lr()[0], grad_norm, eval_loss)
            if diloco is not None:
                rec["diloco"] = diloco.stats(step)
            if fssdp is not None:
                rec["fssdp"] = fssdp.stats()
            metrics.log(rec)
        stop = preemption.agreed(comm)
        if cfg.checkpoint.enabled and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop):
            per_rank = rng_state(device)
            if diloco is not None:
                per_rank["diloco"] = diloco.state_dict(optimizer)
            if fssdp is not None:
                per_rank["fssdp"] = fssdp.state_dict()
            with fssdp.canonical(optimizer) if fssdp is not None else nullcontext():  # expert order on disk
                checkpointer.save(step, model, optimizer, scheduler, {"loader": loader.state_dict()}, per_rank, layout)
        maybe_inject_fault(step, env)
        if stop:
            metrics.close()  # flush W&B before the requeue: Slurm kills the job right after it
            if not cfg.checkpoint.enabled:  # a requeued job would start over: stop, and say so
                log.warning("stop requested (SIGUSR1) at step %d with checkpoint.enabled=false: nothing was saved, "
                            "so the job is not requeued", step)
                break
            if step >= cfg.train.steps:  # nothing left: a requeued job would only find the run finished
                log.info("stop requested (SIGUSR1) at the last step %d: training is complete, not requeued", step)
                break
            log.info("stop requested (SIGUSR1): checkpointed step %d", step)
            if env.is_rank0:
                requeue_slurm_job()
            break
    else:
        if diloco is not None:
            diloco.finish()
    return rec


def make_diloco(model, cfg: JobConfig, group, comm: Comm, env: DistEnv) -> DiLoCo | None:
    g = cfg.diloco
    if not g.enabled:
        return None
    membership = worker_group = None
    if g.elastic:
        worker_group = dist.group.WORLD if env.world_size > 1 else None
        membership = Membership(g.store, cfg.train.name, g.worker, g.workers, env.rank, g.timeout_s, g.settle_s,
                                worker_group, comm)
    return DiLoCo(model, cfg.model.n_layers, g, group, comm, membership, worker_group)


def fast_forward(step: int, loader: TokenLoader, scheduler, cfg: JobConfig) -> None:
    """Puts the data order and the learning-rate schedule at `step` (a DiLoCo worker that joined late)."""
    loader.load_state_dict({"batches_served": step * cfg.train.grad_accum})
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                   strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def layout_name(cfg: JobConfig, dims: ParallelDims) -> str:
    return (f"dp_replicate={dims.dp_replicate} dp={dims.dp} ep={dims.ep} tp={dims.tp} "
            f"dp_shard={str(cfg.parallel.dp_shard).lower()} placement={cfg.moe.placement}")


def train_step(cfg, model, par, optimizer, loader, window, mesh, comm, device, autocast, fssdp=None) -> torch.Tensor:
    """Forward and backward over the micro-batches, gradient reduction, clip, optimizer step. Returns the
    gradient norm as a tensor: no host sync here beyond the ones the experts' split sizes need."""
    optimizer.zero_grad(set_to_none=True)
    step_load = []
    for _ in range(cfg.train.grad_accum):
        x, y = loader.next_batch()
        with autocast:
            logits, stats = model(x.to(device))
        ce = token_loss(logits, y.to(device))
        aux, z = moe_losses(stats)
        loss = ce + cfg.moe.aux_loss_coef * aux + cfg.moe.z_loss_coef * z
        (loss / cfg.train.grad_accum).backward()
        window.add_micro(ce, aux, z, stats, x.numel())
        step_load.append([s.tokens_per_expert_E.detach() for s in stats])
    if fssdp is not None:
        fssdp.record(step_load)
    par.grad_sync.average()
    grad_norm = clip_grad_norm(list(model.parameters()), comm, cfg.optim.grad_clip)
    optimizer.step()
    if cfg.moe.bias_update_rate > 0:
        update_router_bias(model, step_load, mesh, comm)
    return grad_norm


def update_router_bias(model, step_load: list[list[torch.Tensor]], mesh: Mesh, comm: Comm) -> None:
    """Aux-loss-free balancing: every rank applies the same bias step from the same global counts."""
    per_layer = [torch.stack(layer).sum(0) for layer in zip(*step_load, strict=True)]
    sizes = [t.numel() for t in per_layer]
    packed = torch.cat(per_layer)
    comm.all_reduce(packed, mesh.group("dense_dp"), "router")
    for layer, load in zip(moe_layers(model), packed.split(sizes), strict=True):
        layer.router.update_bias(load.to(layer.router.expert_bias.device))


class Preemption:
    """Set by SIGUSR1 (Slurm's warning before a time limit or preemption). Ranks receive the signal
    at different moments, so at the end of every step they agree through one tiny all-reduce:
    either every rank checkpoints and stops after this step, or none does. The flag is a host value
    and travels over the gloo control group (see launch/env.py): no device sync."""

    def __init__(self, group) -> None:
        self.requested = False
        self.group = group
        signal.signal(signal.SIGUSR1, self._set)

    def _set(self, _signum, _frame) -> None:
        self.requested = True

    def agreed(self, comm: Comm) -> bool:
        flag = [1 if self.requested else 0]
        if self.group is not None:
            flag = comm.all_reduce_ints(flag, self.group, "control", op=dist.ReduceOp.MAX)
        return bool(flag[0])


def requeue_slurm_job() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("not running under Slurm: stopping without requeue")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
    else:
        log.info("requeued Slurm job %s", job)


def maybe_inject_fault(step: int, env: DistEnv) -> None:
    """Test hook: EXPERTMESH_KILL_AT="step:rank" SIGKILLs that rank after that step, on the first
    attempt only (torchrun restarts count up in TORCHELASTIC_RESTART_COUNT)."""
    spec = os.environ.get("EXPERTMESH_KILL_AT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kill_step, kill_rank = (int(v) for v in spec.split(":"))
    if step == kill_step and env.rank == kill_rank:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class Window:
    """Accumulates what happened since the last metrics line, on the device (no host sync per step);
    `record` reduces it across ranks in one all-reduce and reads it back in one sync."""

    def __init__(self, mesh: Mesh, comm: Comm, tap: CollectiveTap, device: torch.device) -> None:
        self.mesh, self.comm, self.tap, self.device = mesh, comm, tap, device
        self.tokens_seen = 0
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(6, dtype=torch.float64, device=self.device)  # last ce, ce, aux, z, dropped, entropy
        self.micro = 0
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self.load = None
        self.peak = 0  # most bytes any one step of the window sent through the wrapper
        self._sent_before = 0

    def add_micro(self, ce, aux, z, stats, tokens: int) -> None:
        self.micro += 1
        self.tokens += tokens
        zero = ce.new_zeros(())
        dropped = sum((s.dropped for s in stats), zero)
        entropy = sum((s.entropy for s in stats), zero) / max(len(stats), 1)
        figures = torch.stack([t.detach().to(ce) for t in (ce, aux, z, dropped, entropy)])
        self.sums[0] = figures[0]
        self.sums[1:] += figures.double()
        if stats:
            load = [s.tokens_per_expert_E.detach().double() for s in stats]
            self.load = load if self.load is None else [a + b for a, b in zip(self.load, load, strict=True)]

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        sent = self.comm.total()  # bytes through the wrapper so far in this window
        self.peak = max(self.peak, sent - self._sent_before)
        self._sent_before = sent

    def record(self, step: int, lr: float, grad_norm: torch.Tensor, eval_loss) -> dict:
        comm_bytes = {k: v / max(self.steps, 1) for k, v in self.comm.take().items()}
        by_op = {k: v / max(self.steps, 1) for k, v in self.comm.take_by_op().items()}
        for key, nbytes in self.tap.take_per_step().items():  # FSDP's and DTensor's, from a sampled step
            label = key.rsplit(".", 1)[0]
            comm_bytes[label] = comm_bytes.get(label, 0.0) + nbytes
            by_op[key] = by_op.get(key, 0.0) + nbytes
        group = self.mesh.group("dense_dp")
        n = self.mesh.dims.degree("dense_dp")
        # One reduction for every figure: this step's loss, window means, dropped and token counts.
        load = self.load or []
        host = torch.tensor([float(self.tokens), self.seconds], dtype=torch.float64, device=self.device)
        packed = torch.cat([host, self.sums, *load])
        self.comm.all_reduce(packed, group, "metrics")
        values = torch.cat([packed, grad_norm.detach().double().reshape(1).to(packed.device)]).tolist()
        tokens, seconds, last_ce, ce, aux, z, dropped, entropy = values[:8]
        seconds /= n
        if self.mesh.dims.independent_replicas:  # DiLoCo: the figures are worker 0's; every worker reads as much
            tokens = tokens * self.mesh.dims.dp_replicate
        self.tokens_seen += int(tokens)
        expert_load, offset = [], 8
        for t in load:
            expert_load.append([int(v) for v in values[offset: offset + t.numel()]])
            offset += t.numel()
        dropped = int(dropped)
        routed = sum(sum(layer) for layer in expert_load) + dropped
        rec = {
            "kind": "train",
            "step": step,
            "time": time.time(),
            "loss": last_ce / n,
            "loss_avg": ce / n / self.micro,
            "eval_loss": eval_loss,
            "lr": lr,
            "grad_norm": values[-1],
            "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_rank": tokens / seconds / self.mesh.dims.world_size,
            "tokens_seen": self.tokens_seen,
            "aux_loss": aux / n / self.micro,
            "z_loss": z / n / self.micro,
            "dropped_tokens": dropped,
            "drop_fraction": dropped / routed if routed else 0.0,
            "router_entropy": entropy / n / self.micro,
            "expert_load": expert_load,
            "comm_bytes_per_step": comm_bytes,
            "comm_bytes_per_step_by_op": by_op,
            "comm_peak_bytes_step": self.peak,
        }
        self._reset()
        return rec


def parse_args(argv, prog: str = "expertmesh.launch.train", description: str = "One training rank."):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="TOML config file (default: the embedded defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.ep=2")
    return p.parse_args(argv)


def setup_logging(env: DistEnv) -> None:
    level = logging.INFO if env.is_rank0 else logging.WARNING  # only rank 0 prints progress
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
                        force=True)


def _exit_on_sigterm(signum, frame):
    # torchrun and Slurm stop workers with SIGTERM: unwind normally so `finally` blocks flush metrics.
    raise SystemExit(128 + signum)


def rank_main(run_fn, argv=None, **parser) -> int:
    """One rank of a job: parse, detect torchrun/Slurm/single, run; config errors said once, exit 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv, **parser)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    env = None
    try:
        env = detect()
        setup_logging(env)
        cfg = config_mod.load(args.config, args.overrides)
        run_fn(cfg, env)
    except (ConfigError, CheckpointError) as e:
        # The same deterministic problem on every rank: say it once.
        if env is None or env.is_rank0:
            print(f"expertmesh: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    return rank_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
