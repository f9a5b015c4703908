"""The training step and the evaluation under pipeline parallelism: schedule runs over the micro-batches
(parallel/pipeline.py builds the stages and runs a schedule), then what train/step.py does after the
backward."""

from __future__ import annotations

import torch

from expertmesh.data.chat import IGNORE
from expertmesh.parallel import pipeline as pp
from expertmesh.parallel.pipeline import Pipeline
from expertmesh.train.step import finish_step


def pipeline_step(pipe: Pipeline, cfg, model, par, optimizer, loader, window, mesh, comm, device, autocast,
                  fssdp=None) -> torch.Tensor:
    """`train/step.py: train_step` under pp: per accumulation step one schedule run over M micro-batches
    (every rank reads them, so the loader's position is the same on every stage), then the gradient
    reduction inside the stage, the clip over the whole model (one more all-reduce over pp), the
    optimizer, and the router biases of the layers this rank holds."""
    g, M = cfg.train.grad_accum, pipe.microbatches
    optimizer.zero_grad(set_to_none=True)
    pipe.loss.scale = 1.0 / (M * g)
    for st in pipe.stages:
        st.loss_scale = 1.0 / (M * g)
    step_load = []
    zero = torch.zeros((), device=device)
    for _ in range(g):
        batches = [loader.next_batch() for _ in range(M)]
        x = torch.cat([bx for bx, _ in batches]).to(device)
        y = torch.cat([by for _, by in batches]).to(device)
        pp.run_schedule(pipe, x, y, autocast)
        micro_stats = pp.per_micro(pipe, M)
        for i, stats in enumerate(micro_stats):
            ce = pipe.loss.values[i] if pipe.last else zero
            aux = sum((s.aux_loss for s in stats), zero) / max(len(pipe.moe_index), 1)
            z = sum((s.z_loss for s in stats), zero) / max(len(pipe.moe_index), 1)
            window.add_micro(ce, aux, z, stats, batches[i][0].numel() if pipe.first else 0)
            step_load.append([s.tokens_per_expert_E.detach() for s in stats])
    return finish_step(cfg, model, par, optimizer, step_load, mesh, comm, fssdp, across=pipe.group)


@torch.no_grad()
def pipeline_eval_sums(pipe: Pipeline, batches, device, autocast) -> torch.Tensor:
    """(loss sum, token count) of the held-out batches through the pipeline, forward only: their rows in
    runs of M micro-batches of the stages' rows (a DiLoCo worker's evaluation batches are larger), a short
    last run padded with rows that carry no loss (IGNORE)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = list(batches)
    if not batches:
        return total
    xs, ys = torch.cat([bx for bx, _ in batches]), torch.cat([by for _, by in batches])
    per_run = pipe.rows * pipe.microbatches
    short = -len(xs) % per_run
    if short:  # padding: the first row again, every target ignored
        xs = torch.cat([xs, xs[:1].expand(short, -1)])
        ys = torch.cat([ys, torch.full_like(ys[:1], IGNORE).expand(short, -1)])
    pipe.loss.sum = True
    try:
        for start in range(0, len(xs), per_run):
            x, y = xs[start: start + per_run].to(device), ys[start: start + per_run].to(device)
            pp.run_schedule(pipe, x, y, autocast)
            if pipe.last:
                total[0] += torch.stack(pipe.loss.values).sum().double()
                total[1] += torch.stack(pipe.loss.counts).sum().double()
    finally:
        pipe.loss.sum = False
        for st in pipe.stages:
            st.stats = []
    return total
