"""The training loop of one rank (`run`; launch/train.py is the process entry that torchrun starts).

Joins the process group, builds the mesh, data, model and optimizer, resumes from the newest intact
checkpoint, and runs a plain loop: a step, then eval, log and checkpoint on schedule. The parts, one hop
away:
  train/wiring.py     data, tokenizer, optimizer, device checks, DiLoCo, the layout name
  train/step.py       the step (forward/backward over micro-batches, reduction, clip, optimizer, router bias)
  train/pipelined.py  the pipelined step and evaluation that replace them under parallel.pp > 1
  train/window.py     the metrics window
  train/control.py    SIGUSR1 agreement, Slurm requeue, fault injection
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from expertmesh import config as config_mod
from expertmesh.config import ConfigError, JobConfig, pp_microbatches
from expertmesh.data.chat import IGNORE
from expertmesh.data.loader import TokenLoader, eval_batches, split_tokens
from expertmesh.dist.checkpoint import Checkpointer, latest_intact, rng_state, set_rng_state
from expertmesh.dist.comm_stats import CollectiveTap, Comm, view_labels
from expertmesh.dist.diloco import replica_group
from expertmesh.dist.env import DistEnv, control_group, init_distributed, pick_device, set_threads
from expertmesh.layers.loss import token_loss
from expertmesh.metrics import Metrics
from expertmesh.models.hf.export import SOURCE_COPY, copy_source_files, export_run
from expertmesh.models.transformer import Transformer, count_params, moe_layer_ids, moe_layers
from expertmesh.parallel.apply import compute_dtype, parallelize_model
from expertmesh.parallel.fssdp import FSSDP
from expertmesh.parallel.mesh import Mesh, ParallelDims
from expertmesh.parallel.pipeline import build_pipeline, build_rank_model, rank_stages, stage_layout, stage_modules
from expertmesh.train.control import Preemption, maybe_hold, maybe_inject_fault, requeue_slurm_job
from expertmesh.train.draft import InLoopHead
from expertmesh.train.pipelined import pipeline_eval_sums, pipeline_step
from expertmesh.train.step import train_step
from expertmesh.train.window import Window
from expertmesh.train.wiring import build_optimizer, check_device_support, layout_name, load_data, make_diloco

log = logging.getLogger("expertmesh")


@torch.no_grad()
def evaluate(model, eval_data, cfg: JobConfig, mesh: Mesh, comm: Comm, device, autocast, diloco=None,
             pipe=None) -> float:
    """Held-out loss; under DiLoCo, of the global model (every fragment's global copy); under pp, through
    the pipeline (`pipe`)."""
    with comm.pause(), (diloco.global_weights() if diloco is not None else nullcontext()):
        loss = _evaluate(model, eval_data, cfg, mesh, comm, device, autocast, pipe)
    # FSDP keeps the root's weights gathered after a forward without backward; under DiLoCo they are the
    # global copies just swapped out again. Freed here, the next forward gathers the local weights.
    for module in [*model.modules(), *(pipe.stages if pipe is not None else ())]:  # stages: FSDP's roots under pp
        if isinstance(module, FSDPModule):
            module.reshard()
    return loss


def _evaluate(model, eval_data, cfg: JobConfig, mesh: Mesh, comm: Comm, device, autocast, pipe=None) -> float:
    model.eval()
    d = mesh.dims
    rank = dist.get_rank() if dist.is_initialized() else 0
    total = torch.zeros(2, dtype=torch.float64, device=device)
    world = d.data_world // d.dp_replicate if d.independent_replicas else d.data_world  # DiLoCo: one worker
    eval_tokens, eval_labels = eval_data
    batches = eval_batches(eval_tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.train.eval_batches,
                           d.data_rank(rank) % world, world, d.data_world, eval_labels)
    if pipe is not None:  # the stages share the rank model's blocks: model.eval() covers them
        total = pipeline_eval_sums(pipe, batches, device, autocast)
    else:
        for x, y in batches:
            with autocast:
                logits, _ = model(x.to(device))
            total[0] += token_loss(logits, y.to(device), "sum")
            total[1] += (y != IGNORE).sum()
    comm.all_reduce(total, mesh.group("dense_dp"), "metrics")
    if pipe is not None:  # the last stage has the sums
        comm.all_reduce(total, mesh.group("pp"), "metrics")
    model.train()
    loss, count = total.tolist()
    return loss / max(count, 1)

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
    micro = cfg.train.grad_accum * (pp_microbatches(cfg.parallel) if dims.pp > 1 else 1)  # per step and rank
    loader = TokenLoader(train_tokens, cfg.data.seq_len, cfg.data.batch_size, shard, shards, cfg.train.seed,
                         micro, train_labels)

    # Model: built on meta, then placed, materialized and initialized from outside.
    make_stages = None
    if dims.pp > 1:  # this rank's stages only; pipeline.py says how they are laid out
        pp_rank = dims.coordinate(env.rank)["pp"]
        model = build_rank_model(cfg, rank_stages(cfg, pp_rank), stage_layout(cfg))
        boundary = compute_dtype(cfg, device) or torch.float32
        make_stages = lambda m: stage_modules(m, cfg, mesh, boundary)  # noqa: E731
    else:
        with torch.device("meta"):
            model = Transformer(cfg)
    par = parallelize_model(model, mesh, cfg, device, comm, make_stages)
    if dims.pp > 1:
        par.pipeline = build_pipeline(par.roots, cfg, mesh, device)
    model = par.model
    optimizer, scheduler = build_optimizer(model, cfg)
    dtype = compute_dtype(cfg, device)  # bf16: FSDP gathers bf16 weights, autocast covers the rest
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    fssdp = None
    if cfg.moe.placement == "fssdp":  # the config check guarantees ep >= 2
        fssdp = FSSDP(moe_layers(model), cfg.moe.fssdp, mesh.group("dense_dp"), comm, moe_layer_ids(model))
    draft = InLoopHead(cfg, model, mesh, comm, device) if cfg.draft_head.enabled else None  # pp: refused
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
        if draft is not None and "draft_head" in per_rank:
            draft.load_state_dict(per_rank["draft_head"])
        elif draft is not None:
            log.warning("the checkpoint has no draft head: the head starts from its initial weights")
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
                         start_step, device, autocast, diloco, fssdp, draft)
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
               start_step, device, autocast, diloco=None, fssdp=None, draft=None) -> dict:
    model = par.model
    preemption = Preemption(control_group(device))
    eval_loss = None
    pipe = par.pipeline
    step_fn = functools.partial(train_step, draft=draft) if pipe is None else functools.partial(pipeline_step, pipe)
    if start_step == 0:
        eval_loss = evaluate(model, eval_data, cfg, mesh, comm, device, autocast, diloco, pipe)
        metrics.log_eval(0, eval_loss)
    tap = CollectiveTap(comm, view_labels(mesh.views))  # FSDP's and DTensor's own collectives
    window = Window(mesh, comm, tap, device, pipe)
    layout = layout_name(cfg, mesh.dims)
    rec: dict = {}
    step = start_step
    while step < cfg.train.steps:
        step += 1
        t0 = time.perf_counter()
        if fssdp is not None:
            fssdp.begin_step(step, optimizer)
        if draft is not None:
            draft.begin(step)
        with tap if window.steps == 0 else nullcontext():  # one sampled step per metrics window
            grad_norm = step_fn(cfg, model, par, optimizer, loader, window, mesh, comm, device, autocast, fssdp)
        tap.steps += window.steps == 0
        scheduler.step()
        if diloco is not None and (at := diloco.after_step(step)) != step:  # elastic: took a peer's state
            fast_forward(at, loader, scheduler, cfg)
            step = at
        window.add_step(time.perf_counter() - t0)

        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            if step == cfg.train.steps and diloco is not None:
                diloco.finish()  # the last exchanges land before the final evaluation
            eval_loss = evaluate(model, eval_data, cfg, mesh, comm, device, autocast, diloco, pipe)
            metrics.log_eval(step, eval_loss)
        if step % cfg.metrics.log_every == 0 or step == cfg.train.steps:
            window_seconds = window.seconds  # this rank's steps since the last record (the head's share of them)
            rec = window.record(step, scheduler.get_last_lr()[0], grad_norm, eval_loss)
            if diloco is not None:
                rec["diloco"] = diloco.stats(step)
            if fssdp is not None:  # under pp, every stage's MoE layers (rank 0's stage may have none)
                rec["fssdp"] = fssdp.stats()
                if mesh.dims.pp > 1:
                    rec["fssdp"] = FSSDP.merge_stages(comm.all_gather_object(rec["fssdp"], mesh.group("pp")))
            if draft is not None and (head := draft.stats(window_seconds)) is not None:  # None: no head step yet
                rec["draft_head"] = head
            if par.compiled is not None:  # this rank's: block forwards, calls into compiled graphs, graphs
                rec["compile"] = par.compiled.take()
            metrics.log(rec)
        stop = preemption.agreed(comm)
        if cfg.checkpoint.enabled and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop):
            per_rank = rng_state(device)
            if diloco is not None:
                per_rank["diloco"] = diloco.state_dict(optimizer)
            if fssdp is not None:
                per_rank["fssdp"] = fssdp.state_dict()
            if draft is not None:
                per_rank["draft_head"] = draft.state_dict()
            with fssdp.canonical(optimizer) if fssdp is not None else nullcontext():  # expert order on disk
                checkpointer.save(step, model, optimizer, scheduler, {"loader": loader.state_dict()}, per_rank, layout)
        if draft is not None and env.is_rank0 and (step == cfg.train.steps or stop or (
                cfg.checkpoint.enabled and step % cfg.checkpoint.every == 0)):
            draft.save(cfg.run_path, step)  # beside the run, also without checkpoints
        maybe_inject_fault(step, env)
        maybe_hold(step)
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

def fast_forward(step: int, loader: TokenLoader, scheduler, cfg: JobConfig) -> None:
    """Puts the data order and the learning-rate schedule at `step` (a DiLoCo worker that joined late). The
    loader counts micro-batches: grad_accum per step, times the pipeline's micro-batches under pp."""
    loader.load_state_dict({"batches_served": step * loader.accum})
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                   strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

