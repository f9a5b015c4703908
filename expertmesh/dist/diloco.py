"""Streaming DiLoCo: `parallel.dp_replicate` workers train apart and meet one fragment at a time.

Each worker (which may itself use dp/ep/tp inside) runs the run's inner optimizer on its own data;
gradients are averaged only inside a worker. Every rank keeps, for each fragment of the model, a
global copy of its own local parameter shards (the same shards in every worker, since the workers
share a layout) and an outer Nesterov-SGD momentum. Fragment f syncs every H steps, the fragments
staggered H/P apart, so at most one fragment is on the wire at any time:

  at step t      delta = theta_global - theta_local (the fragment's pseudo-gradient), averaged over
                 the workers (fp32 all-reduce, or the 4/8-bit reduce-scatter/all-gather of
                 compress.py); with overlap tau > 0 the exchange runs in a background thread
  at step t+tau  theta_global <- outer_sgd(theta_global, mean delta); then
                 theta_local <- theta_global (tau = 0), or alpha * theta_local + (1 - alpha) * theta_global

Fragments: transformer blocks go to P fragments (`strided`: block i -> i mod P; `sequential`:
contiguous runs); embeddings, final norm and head form their own fragment, synced in the same
slot as the last block fragment. With P = 1 this is DiLoCo. Inner optimizer state never leaves
the rank. Attached to the training loop through `after_step(step)`, nothing subclassed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass

import torch
from torch import nn

from expertmesh.config import DiLoCoConfig
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.compress import quantized_all_reduce_mean
from expertmesh.parallel.data_parallel import local_part

log = logging.getLogger(__name__)
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def replica_group(dims):
    """A process group of this rank and its counterparts in the other workers, of its own: the
    exchange may run in a background thread, and gloo must not see two threads on one group."""
    import torch.distributed as dist

    if dims.dp_replicate == 1:
        return None
    per_worker = dims.world_size // dims.dp_replicate  # dp_replicate is the outermost axis
    groups = [[i + w * per_worker for w in range(dims.dp_replicate)] for i in range(per_worker)]
    group, _ = dist.new_subgroups_by_enumeration(groups, backend=dist.get_backend())
    return group


def assign_fragments(names: list[str], n_layers: int, fragments: int, pattern: str) -> list[int]:
    """Fragment index of each parameter name: 0..P-1 for blocks, P for everything outside them."""
    per_run = -(-n_layers // fragments)
    out = []
    for name in names:
        m = _BLOCK.search(name)
        if m is None:
            out.append(fragments)
        else:
            i = int(m.group(1))
            out.append(i % fragments if pattern == "strided" else i // per_run)
    return out


@dataclass
class _Pending:
    fragments: list[int]  # exchanged one after the other by one thread: one collective at a time on the group
    apply_at: int
    thread: threading.Thread | None
    result: list  # mean delta per fragment, once done


class DiLoCo:
    def __init__(self, model: nn.Module, n_layers: int, cfg: DiLoCoConfig, group, comm: Comm) -> None:
        self.cfg, self.group, self.comm = cfg, group, comm
        named = [(n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters()]
        frag = assign_fragments([n for n, _ in named], n_layers, cfg.fragments, cfg.pattern)
        self.params: list[list[nn.Parameter]] = [[] for _ in range(cfg.fragments + 1)]
        for (_, p), f in zip(named, frag, strict=True):
            self.params[f].append(p)
        self.global_copy = [self._flat(f).clone() for f in range(len(self.params))]
        self.momentum = [torch.zeros_like(g) for g in self.global_copy]
        self.pending: list[_Pending] = []
        self.outer_steps = 0
        self.last_sync = [0] * len(self.params)
        self.bytes_last_sync = 0

    def _flat(self, f: int) -> torch.Tensor:
        parts = [local_part(p).detach().float().reshape(-1) for p in self.params[f]]
        return torch.cat(parts) if parts else torch.zeros(0)

    def _write(self, f: int, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params[f]:
                t = local_part(p)
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()

    def fragments_starting(self, step: int) -> list[int]:
        """Fragments whose exchange starts after inner step `step` (1-based)."""
        H, P = self.cfg.sync_every, self.cfg.fragments
        spacing = H // P
        if step % spacing:
            return []
        k = (step % H // spacing - 1) % P  # fragment 0 at H/P, 1 at 2H/P, ..., P-1 (and the rest) at H
        return [k, P] if k == P - 1 else [k]

    def _exchange(self, deltas: list[torch.Tensor], out: list) -> None:
        counter = Comm()  # its own counter: this may run in a thread while the loop reads and resets `comm`
        for delta in deltas:
            if self.cfg.quant_bits:
                mean = quantized_all_reduce_mean(delta, self.group, counter, self.cfg.quant_bits,
                                                 self.cfg.quant_block, "diloco")
            else:
                mean = delta.clone()
                counter.all_reduce(mean, self.group, "diloco")
                if self.group is not None:
                    mean /= torch.distributed.get_world_size(self.group)
            out.append(mean)
        self.bytes_last_sync = counter.total()
        self.comm.count("diloco", self.bytes_last_sync)

    def after_step(self, step: int) -> None:
        for p in [p for p in self.pending if p.apply_at == step]:
            self._apply(p)
            self.pending.remove(p)
        fragments = self.fragments_starting(step)
        if not fragments:
            return
        deltas = [self.global_copy[f] - self._flat(f) for f in fragments]
        pend = _Pending(fragments, step + self.cfg.overlap, None, [])
        if self.cfg.overlap == 0:
            self._exchange(deltas, pend.result)
            self._apply(pend)
        else:
            pend.thread = threading.Thread(target=self._exchange, args=(deltas, pend.result), daemon=True)
            pend.thread.start()
            self.pending.append(pend)

    @contextlib.contextmanager
    def global_weights(self):
        """Inside, the model holds the global copies (what the workers agree on); the local weights
        come back after."""
        saved = [self._flat(f) for f in range(len(self.params))]
        for f, g in enumerate(self.global_copy):
            self._write(f, g)
        try:
            yield
        finally:
            for f, flat in enumerate(saved):
                self._write(f, flat)

    def finish(self) -> None:
        """End of training: applies the exchanges still in flight (a thread must not outlive the run)."""
        for p in self.pending:
            self._apply(p)
        self.pending = []

    def _apply(self, pend: _Pending) -> None:
        if pend.thread is not None:
            pend.thread.join()
            pend.thread = None
        c = self.cfg
        for f, g in zip(pend.fragments, pend.result, strict=True):
            buf = self.momentum[f]
            buf.mul_(c.outer_momentum).add_(g)
            update = g + c.outer_momentum * buf if c.nesterov else buf
            self.global_copy[f].sub_(c.outer_lr * update)
            if c.overlap == 0:
                self._write(f, self.global_copy[f])
            else:
                self._write(f, c.merge_alpha * self._flat(f) + (1 - c.merge_alpha) * self.global_copy[f])
            self.outer_steps += 1
            self.last_sync[f] = pend.apply_at

    def stats(self, step: int) -> dict:
        return {"outer_steps": self.outer_steps, "bytes_last_sync": self.bytes_last_sync,
                "staleness": [step - s for s in self.last_sync]}

    # Checkpoint: per-rank state. The global copies are this rank's shards; and since workers hold
    # different weights and inner optimizer moments, which DCP would save once for all of them,
    # this rank's local weights and inner optimizer state are kept here too.
    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        for p in self.pending:  # finish in-flight exchanges; their results are applied on schedule
            if p.thread is not None:
                p.thread.join()
                p.thread = None
        return {"global_copy": self.global_copy, "momentum": self.momentum, "outer_steps": self.outer_steps,
                "local": [self._flat(f) for f in range(len(self.params))],  # the workers differ: DCP keeps one
                "last_sync": self.last_sync,
                "pending": [(p.fragments, p.apply_at, p.result) for p in self.pending],
                "inner": [{k: local_part(v).clone() if isinstance(v, torch.Tensor) else v
                           for k, v in optimizer.state.get(p, {}).items()} for ps in self.params for p in ps]}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        self.global_copy = [t.clone() for t in state["global_copy"]]
        self.momentum = [t.clone() for t in state["momentum"]]
        self.outer_steps, self.last_sync = state["outer_steps"], list(state["last_sync"])
        self.pending = [_Pending(list(fs), at, None, [r.clone() for r in rs]) for fs, at, rs in state["pending"]]
        for f, flat in enumerate(state["local"]):
            self._write(f, flat)
        params = [p for ps in self.params for p in ps]
        with torch.no_grad():
            for p, saved in zip(params, state["inner"], strict=True):
                for k, v in saved.items():
                    current = optimizer.state[p].get(k)
                    if isinstance(current, torch.Tensor):
                        local_part(current).copy_(v)
                    else:
                        optimizer.state[p][k] = v
