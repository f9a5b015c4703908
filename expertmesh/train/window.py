"""The metrics window: what happened since the last metrics line, accumulated on the device and reduced
across ranks once per line."""

from __future__ import annotations

import time

import torch

from expertmesh.dist.comm_stats import CollectiveTap, Comm
from expertmesh.metrics import moe_layer_stats
from expertmesh.parallel.mesh import Mesh


class Window:
    """Accumulates what happened since the last metrics line, on the device (no host sync per step);
    `record` reduces it across ranks in one all-reduce and reads it back in one sync. Under pp (`pipe`) each
    rank holds some layers: their figures go in those layers' slots of every MoE layer's, the tokens are
    counted by the first stage, the loss by the last, and `record` adds one all-reduce over pp."""

    def __init__(self, mesh: Mesh, comm: Comm, tap: CollectiveTap, device: torch.device, pipe=None) -> None:
        self.mesh, self.comm, self.tap, self.device, self.pipe = mesh, comm, tap, device, pipe
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
        entropy = sum((s.entropy for s in stats), zero) / max(len(stats) if self.pipe is None else
                                                              len(self.pipe.moe_index), 1)
        figures = torch.stack([t.detach().to(ce) for t in (ce, aux, z, dropped, entropy)])
        self.sums[0] = figures[0]
        self.sums[1:] += figures.double()
        load = [s.tokens_per_expert_E.detach().double() for s in stats]
        if self.pipe is not None:  # every MoE layer's slot; the ones other stages hold stay zero
            full = [torch.zeros(n, dtype=torch.float64, device=self.device) for n in self.pipe.experts]
            for slot, t in zip(self.pipe.owned_moe_layers, load, strict=True):
                full[slot] = t
            load = full
        if load:
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
        if self.pipe is not None:
            self.comm.all_reduce(packed, self.pipe.group, "metrics")
            n_time = n * self.mesh.dims.pp  # every rank timed the step
        else:
            n_time = n
        values = torch.cat([packed, grad_norm.detach().double().reshape(1).to(packed.device)]).tolist()
        tokens, seconds, last_ce, ce, aux, z, dropped, entropy = values[:8]
        seconds /= n_time
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
            "moe_layers": moe_layer_stats(expert_load),
            "comm_bytes_per_step": comm_bytes,
            "comm_bytes_per_step_by_op": by_op,
            "comm_peak_bytes_step": self.peak,
        }
        self._reset()
        return rec
