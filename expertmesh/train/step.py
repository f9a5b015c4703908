"""One training step without pipeline parallelism: forward and backward over the micro-batches, gradient
reduction, clip, optimizer step, and the router-bias update (`train/pipelined.py` has the pipelined step)."""

from __future__ import annotations

import torch

from expertmesh.dist.comm_stats import Comm
from expertmesh.layers.loss import token_loss
from expertmesh.models.transformer import moe_layers
from expertmesh.parallel.data_parallel import clip_grad_norm
from expertmesh.parallel.mesh import Mesh


def moe_losses(stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean load-balance and z-loss over the MoE layers (zero for a model without any)."""
    if not stats:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack([s.aux_loss for s in stats]).mean(), torch.stack([s.z_loss for s in stats]).mean()


def train_step(cfg, model, par, optimizer, loader, window, mesh, comm, device, autocast, fssdp=None,
               draft=None) -> torch.Tensor:
    """Forward and backward over the micro-batches, gradient reduction, clip, optimizer step; a draft head
    (train/draft.py) learns from each micro-batch's forward and steps after the target. Returns the
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
        if draft is not None:
            draft.add_micro(logits.detach(), autocast)
    grad_norm = finish_step(cfg, model, par, optimizer, step_load, mesh, comm, fssdp)
    if draft is not None:
        draft.step()
    return grad_norm


def finish_step(cfg, model, par, optimizer, step_load, mesh, comm, fssdp=None, across=None) -> torch.Tensor:
    """What follows the backward passes, with or without a pipeline: FSSDP's load record, the gradient
    reductions, the clip (its squares also summed over `across`: the pipeline's group), the optimizer step,
    and the router biases. `step_load`: per micro-batch, the tokens per expert of this rank's MoE layers."""
    if fssdp is not None:
        fssdp.record(step_load)
    par.grad_sync.average()
    grad_norm = clip_grad_norm(list(model.parameters()), comm, cfg.optim.grad_clip, across)
    optimizer.step()
    if cfg.moe.bias_update_rate > 0:
        update_router_bias(model, step_load, mesh, comm)
    return grad_norm


def update_router_bias(model, step_load: list[list[torch.Tensor]], mesh: Mesh, comm: Comm) -> None:
    """Aux-loss-free balancing: every rank applies the same bias step from the same global counts. A rank
    without MoE layers (a dense pipeline stage) has none to move; its stage's ranks all skip alike."""
    if not step_load or not step_load[0]:
        return
    per_layer = [torch.stack(layer).sum(0) for layer in zip(*step_load, strict=True)]
    sizes = [t.numel() for t in per_layer]
    packed = torch.cat(per_layer)
    comm.all_reduce(packed, mesh.group("dense_dp"), "router")
    for layer, load in zip(moe_layers(model), packed.split(sizes), strict=True):
        layer.router.update_bias(load.to(layer.router.expert_bias.device))
