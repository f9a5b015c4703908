"""A draft head trained inside the target's training run (`draft_head.enabled`).

Hooks from outside the model keep what the step's own forward computes: the residual stream after three
blocks and the embedding output (detached). After each micro-batch's backward the head takes its
training-time-test loss against the target's logits of that forward (no second target forward) and
backpropagates into its own weights only. After the target's optimizer step the head's gradients are
averaged over the ranks that see different tokens (`dense_dp`, one all-reduce with its metrics), clipped,
and its own AdamW steps on its own warmup + cosine schedule. With `draft_head.every = k` all of that happens on
the steps divisible by k only: the head's cost, data and steps fall k-fold.

The head is replicated: every rank holds all of it and applies the same averaged gradient, so every
layout trains the head one process would train on the global batch (tests/distributed/test_draft_head.py).
Under sequence parallelism a block's output is this rank's slice of the sequence: the slices are
gathered over tp. The LM head is the target's, gathered whole (FSDP, vocab parallelism) once per step.
Its state goes into every rank's checkpoint file; rank 0 also writes `runs/<name>/draft_head/`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from expertmesh.config import JobConfig
from expertmesh.config.checks import draft_head_layers
from expertmesh.dist.comm_stats import Comm, group_size
from expertmesh.distill.head import DraftHead, save_head, ttt_loss
from expertmesh.parallel.mesh import Mesh
from expertmesh.train.wiring import warmup_cosine

HEAD_DIR = "draft_head"


class InLoopHead:
    def __init__(self, cfg: JobConfig, model: torch.nn.Module, mesh: Mesh, comm: Comm, device: torch.device) -> None:
        h = cfg.draft_head
        self.cfg, self.model, self.comm, self.device = cfg, model, comm, device
        self.layers = draft_head_layers(cfg)
        self.group, self.tp = mesh.group("dense_dp"), mesh.group("tp")
        with torch.random.fork_rng(devices=[]):  # the same initial head on every rank, whatever the layout
            torch.manual_seed(cfg.train.seed + 1)
            self.head = DraftHead(cfg.model, h)
        self.head.to(device)
        decay = [p for p in self.head.parameters() if p.ndim >= 2]
        rest = [p for p in self.head.parameters() if p.ndim < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}],
                                           lr=h.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.scheduler = warmup_cosine(self.optimizer, h.warmup_steps, cfg.train.steps // h.every, o.min_lr_ratio)
        self.on = True  # whether the head trains on this step (`draft_head.every`)
        self.steps_taken = 0  # the head's steps since this process started
        self.captured: dict[str, torch.Tensor] = {}
        self.hooks = [model.tok_embeddings.register_forward_hook(self._keep("emb"))]
        self.hooks += [model.layers[str(i)].register_forward_hook(self._keep(i)) for i in sorted(set(self.layers))]
        self.lm_head: torch.Tensor | None = None
        self.sums = torch.zeros(1 + 2 * h.ttt_steps, dtype=torch.float64, device=device)  # micros, loss/top-1 by step
        self.last = torch.zeros_like(self.sums)  # the last step's sums, over the data ranks
        self.seconds = 0.0  # the head's own time since the last record (CUDA: events, read when it is logged)
        self.events: list = []

    def _clock(self):
        if self.device.type == "cuda":  # no host sync per step: events, read at the record
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _took(self, start) -> None:
        if self.device.type == "cuda":
            self.events.append((start, self._clock()))
        else:
            self.seconds += time.perf_counter() - start

    def _keep(self, key):
        def hook(module, args, out):
            self.captured[key] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    def _whole(self, t: torch.Tensor, S: int) -> torch.Tensor:
        """A captured [B, S, D] tensor whole: sequence parallelism leaves each tp rank its slice."""
        if t.shape[1] == S:
            return t
        n = group_size(self.tp)
        parts = torch.empty((n * t.shape[1], *t.shape[:1], *t.shape[2:]), dtype=t.dtype, device=t.device)
        self.comm.all_gather_into_tensor(parts, t.transpose(0, 1).contiguous(), self.tp, "draft_head")
        return parts.transpose(0, 1)

    def _lm_head(self) -> torch.Tensor:
        if self.lm_head is None:
            w = self.model.output.weight
            self.lm_head = (w.full_tensor() if isinstance(w, DTensor) else w).detach()
        return self.lm_head

    def begin(self, step: int) -> None:
        """Before the target's step `step` (from 1): the head trains on it if `draft_head.every` divides it."""
        self.on = step % self.cfg.draft_head.every == 0
        self.lm_head = None  # the target has stepped since it was gathered

    def add_micro(self, logits_BSV: torch.Tensor, autocast) -> None:
        """Trains on the micro-batch whose forward just ran (call after the target's backward)."""
        if not self.on:
            self.captured.clear()
            return
        start = self._clock()
        S = logits_BSV.shape[1]
        feats = [self._whole(self.captured[i], S) for i in self.layers]
        emb = self._whole(self.captured["emb"], S)
        with autocast:
            loss, per_step, agree = ttt_loss(self.head, feats, emb, logits_BSV, self._lm_head(), self.cfg.draft_head)
        (loss / self.cfg.train.grad_accum).backward()
        self.sums += torch.cat([torch.ones(1, device=self.device), per_step.to(self.device), agree.to(self.device)])
        self.captured.clear()
        self._took(start)

    def step(self) -> None:
        """Averages the head's gradients (and its metrics) over the data ranks, clips, and steps."""
        if not self.on:
            return
        start = self._clock()
        params = [p for p in self.head.parameters()]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten().double() for g in grads] + [self.sums])
        self.comm.all_reduce(flat, self.group, "draft_head")
        n = group_size(self.group)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = (flat[offset:offset + g.numel()] / n).view_as(g).to(g.dtype)
            offset += g.numel()
        self.last = flat[offset:]  # read on the host only when a record is logged
        if self.cfg.draft_head.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.draft_head.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sums.zero_()
        self.steps_taken += 1
        self._took(start)

    def stats(self, window_seconds: float) -> dict | None:
        """The last head step's loss (step 0 of the training-time test) and, per unrolled step, its loss and
        top-1 agreement with the target, averaged over the data ranks' micro-batches; and `step_share`, the
        head's part of this rank's step time since the last record (`window_seconds`: the steps' time), its
        own work timed in the same steps (its loss, backward, gradient all-reduce and optimizer step). None
        while the head has not stepped in this process (`draft_head.every` > the steps so far)."""
        steps = self.cfg.draft_head.ttt_steps
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events = []
        share, self.seconds = self.seconds / window_seconds if window_seconds > 0 else 0.0, 0.0
        if not self.steps_taken:
            return None
        by_step = (self.last[1:] / self.last[0].clamp_min(1)).tolist()
        return {"loss": by_step[0], "loss_by_step": by_step[:steps], "top1_by_step": by_step[steps:],
                "lr": self.scheduler.get_last_lr()[0], "step_share": share}

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, run_path: Path, step: int) -> Path:
        """Writes the head beside the run (`draft_head/`: weights and what loading them needs), atomically."""
        return save_head(self.head, self.layers, self.cfg.model, self.cfg.draft_head, run_path / HEAD_DIR,
                         {"step": step})

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
