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

Aux-loss-free balancing biases (`expert_bias`, buffers that no gradient moves) travel with their
block's fragment: each sync averages them over the workers (fp32, beside the pseudo-gradient), the
mean becomes the fragment's global bias, and a worker's bias moves by (mean - its bias when the
exchange started), which keeps the steps it took during an overlapped exchange. The elastic digest
and the state a leader hands over include the global biases.

Fragments: transformer blocks go to P fragments (`strided`: block i -> i mod P; `sequential`:
contiguous runs); embeddings, final norm and head form their own fragment, synced in the same
slot as the last block fragment. With P = 1 this is DiLoCo. Inner optimizer state never leaves
the rank. Attached to the training loop through `after_step(step)`, nothing subclassed.

Elastic workers (`diloco.elastic`, elastic.py): the outer group is re-formed when an exchange fails
(a worker left: its fragment's outer step is skipped, the pseudo-gradient keeps accumulating for the
next one) or when a worker asks to join; then the member furthest along sends its global copies,
outer momentum, step and sync times to every member whose state differs, and those take them as
their local weights too. Only a worker that the store lists as a member of the last connected group
may lead (a joiner that claims to be a member further along is not believed; elastic.py states the
trust boundary and the optional HMAC secret), and a joiner's state counts only once its digest equals
the leader's. `after_step` returns the step the loop is at, which a joiner changes.

Communicators per thread (NCCL forbids two threads on one communicator; gloo interleaves them):
the exchange thread issues collectives only on the outer group, which is a process group of its own
(`replica_group`: its own NCCL communicator, never one of the mesh's), or under `elastic` a gloo
`StoreGroup` of the epoch. While an exchange is in flight the main thread touches neither: it uses
the mesh's groups (all-to-all, FSDP, metrics), the gloo control group, and the job's WORLD for the
elastic flags, and it joins the thread before `_agree`/`_reform` use the outer group again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from expertmesh.config import DiLoCoConfig
from expertmesh.dist.comm_stats import Comm, group_device, group_size
from expertmesh.dist.compress import quantized_all_reduce_mean, sparse_all_reduce_mean
from expertmesh.dist.elastic import Membership
from expertmesh.dist.shards import local_part

log = logging.getLogger(__name__)
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def replica_group(dims):
    """A process group of this rank and its counterparts in the other workers, of its own: the
    exchange may run in a background thread, and gloo must not see two threads on one group."""
    import torch.distributed as dist

    if dims.dp_replicate == 1:
        return None
    groups: dict[tuple, list[int]] = {}  # ranks alike in every coordinate but dp_replicate (pp is outside it)
    for rank in range(dims.world_size):
        coord = dims.coordinate(rank)
        groups.setdefault(tuple(v for axis, v in coord.items() if axis != "dp_replicate"), []).append(rank)
    group, _ = dist.new_subgroups_by_enumeration(list(groups.values()), backend=dist.get_backend())
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


def choose_lead(rows: torch.Tensor, previous: list[int]) -> int:
    """rows[i] = (step, outer steps, digest, says it was a member) of the i-th worker of the group;
    `previous`: the indices of the workers that the store lists as members of the last connected group.
    Only those may lead (a joiner, whatever its row claims, takes the state and never gives it); among
    them the ones still running since (a restarted member says it was not), then the furthest along
    (outer steps, then step, then the lowest index). With no previous group (the first forming) anyone may."""
    eligible = [i for i in previous if rows[i, 3] > 0] or list(previous) or list(range(rows.shape[0]))
    return max(eligible, key=lambda i: (rows[i, 1].item(), rows[i, 0].item(), -i))


class StateMismatch(Exception):
    """A worker's state differs from the leader's after the hand-over: it must not contribute."""


@dataclass
class _Pending:
    fragments: list[int]  # exchanged one after the other by one thread: one collective at a time on the group
    apply_at: int
    thread: threading.Thread | None
    result: list  # mean delta per fragment, once done
    bias_start: list  # this worker's balancing biases per fragment when the exchange started
    bias_mean: list  # their mean over the workers, once done
    failed: bool = False  # elastic: the outer group broke during the exchange (a worker left)
    want: bool = False  # elastic: some member saw a worker asking to join
    error: BaseException | None = None  # not elastic: what broke the exchange, re-raised by the main thread
    ready: object = None  # on a GPU: the training stream's event once the deltas are computed (the exchange waits)
    done: object = None  # on a GPU: the exchange stream's event after the last collective (the main stream waits)
    residual: list = field(default_factory=list)  # compress="topk": per fragment, the error feedback once sent
    touched: list = field(default_factory=list)  # expert_sparse: per fragment, the expert rows this worker trained


class DiLoCo:
    def __init__(self, model: nn.Module, n_layers: int, cfg: DiLoCoConfig, group, comm: Comm,
                 membership: Membership | None = None, worker_group=None) -> None:
        self.cfg, self._group, self.comm = cfg, group, comm
        self.membership, self.worker_group = membership, worker_group  # elastic only
        self.left = self.joined = 0
        named = [(n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters()]
        frag = assign_fragments([n for n, _ in named], n_layers, cfg.fragments, cfg.pattern)
        self.params: list[list[nn.Parameter]] = [[] for _ in range(cfg.fragments + 1)]
        # expert_sparse: per fragment, its stacked expert weights as (param, offset in the flat vector, rows,
        # values per row): a row is one expert's slab of one weight on this rank
        self.expert_rows: list[list[tuple[nn.Parameter, int, int, int]]] = [[] for _ in range(cfg.fragments + 1)]
        offsets = [0] * (cfg.fragments + 1)
        for (name, p), f in zip(named, frag, strict=True):
            self.params[f].append(p)
            t = local_part(p)
            if cfg.expert_sparse and name.rsplit(".", 2)[-2:] in (["experts", "w1"], ["experts", "w2"],
                                                                 ["experts", "w3"]) and t.numel():
                self.expert_rows[f].append((p, offsets[f], t.shape[0], t.numel() // t.shape[0]))
            offsets[f] += t.numel()
        self.device = local_part(named[0][1]).device
        # overlapped exchanges on a GPU run their collectives on a stream of their own
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith("expert_bias")]
        self.biases: list[list[torch.Tensor]] = [[] for _ in range(cfg.fragments + 1)]
        for (_, b), f in zip(biases, assign_fragments([n for n, _ in biases], n_layers, cfg.fragments, cfg.pattern),
                             strict=True):
            self.biases[f].append(b)
        self.global_copy = [self._flat(f).clone() for f in range(len(self.params))]
        self.global_bias = [self._bias(f).clone() for f in range(len(self.params))]
        self.momentum = [torch.zeros_like(g) for g in self.global_copy]
        # compress="topk": this worker's error feedback per fragment (what it has not sent yet); its own, never shared
        self.error = [torch.zeros_like(g) for g in self.global_copy] if cfg.compress == "topk" else []
        # expert_sparse: the rows whose gradient was non-zero in some step since the fragment's last exchange began
        self.touched = [torch.zeros(sum(r for _, _, r, _ in rows), dtype=torch.bool, device=self.device)
                        for rows in self.expert_rows]
        self.expert_rows_last_sync = (0, 0)  # expert_sparse: (rows sent, rows) in the last exchange
        self.pending: list[_Pending] = []
        self.was_member = False  # elastic: this process has been in an outer group (a joiner has not)
        self.outer_steps = 0
        self.last_sync = [0] * len(self.params)
        self.bytes_last_sync = 0
        self.seconds_last_sync = 0.0  # how long the last exchange took (a slow link shows here)

    @property
    def group(self):
        return self.membership.group if self.membership is not None else self._group

    def _flat(self, f: int) -> torch.Tensor:
        parts = [local_part(p).detach().float().reshape(-1) for p in self.params[f]]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def _bias(self, f: int) -> torch.Tensor:
        parts = [b.detach().float().reshape(-1) for b in self.biases[f]]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def _write_bias(self, f: int, flat: torch.Tensor) -> None:
        offset = 0
        for b in self.biases[f]:
            b.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()

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

    def _exchange(self, deltas: list[torch.Tensor], pend: _Pending) -> None:
        """Runs on the main thread (tau = 0) or the exchange thread: the mean pseudo-gradient of each
        fragment in `pend`, then the mean of their balancing biases (one small fp32 all-reduce)."""
        counter = Comm()  # its own counter: this may run in a thread while the loop reads and resets `comm`
        group = self.group
        started = time.monotonic()
        try:
            if self.membership is not None:  # elastic: agree on whether to let a waiting worker in
                want = counter.all_reduce_ints([int(self.membership.someone_waiting())], group, "control",
                                               op=torch.distributed.ReduceOp.MAX)
                pend.want = bool(want[0])
            sent_rows = total_rows = 0
            for i, (f, delta) in enumerate(zip(pend.fragments, deltas, strict=True)):
                if group is not None and self.membership is not None:
                    delta = delta.cpu()  # the outer group is gloo
                keep = mine = None
                if pend.touched and pend.touched[i].numel():
                    keep, mine, denom, counts = self._expert_masks(f, pend.touched[i], group, counter)
                    delta = delta * mine
                    sent_rows, total_rows = sent_rows + int((counts > 0).sum()), total_rows + counts.numel()
                c = self.cfg
                e = c.error_decay * self.error[f].to(delta.device) + delta if c.compress == "topk" else delta
                x = e if keep is None else (e * mine)[keep]  # a row this worker did not train sends nothing
                mean, sent = self._mean(x, group, counter)
                if keep is not None:  # each trained row's mean over the workers that trained it (or, already,
                    # over those that sent each value); the rest 0
                    scale = 1.0 if c.topk_average == "senders" else group_size(group) / denom
                    mean = torch.zeros_like(delta).masked_scatter_(keep, mean * scale)
                    sent = None if sent is None else torch.zeros_like(delta).masked_scatter_(keep, sent)
                if sent is not None:
                    pend.residual.append((e - sent).to(self.global_copy[0].device))
                pend.result.append(mean.to(self.global_copy[0].device))
            self.expert_rows_last_sync = (sent_rows, total_rows)
            biases = torch.cat(pend.bias_start)
            if biases.numel():
                if group is not None and self.membership is not None:
                    biases = biases.cpu()
                biases = biases.clone()
                counter.all_reduce(biases, group, "diloco")
                biases /= group_size(group)
                pend.bias_mean = list(biases.to(self.device).split([b.numel() for b in pend.bias_start]))
        except Exception as err:  # noqa: BLE001 (the thread has no caller: the main thread re-raises it)
            if self.membership is None or not isinstance(err, RuntimeError):
                pend.error = err
                return
            pend.failed, pend.result, pend.bias_mean, pend.residual = True, [], [], []
            log.warning("DiLoCo: the exchange of fragments %s failed (%s)", pend.fragments,
                        str(err).splitlines()[0][:200])
        self.bytes_last_sync = counter.sent.get("diloco", 0)
        self.seconds_last_sync = time.monotonic() - started
        counter.take()
        for key, n in counter.take_by_op().items():
            label, op = key.rsplit(".", 1)
            self.comm.count(label, n, op)

    def _mean(self, x: torch.Tensor, group, counter: Comm) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean of flat `x` over the outer group as the config encodes it, and (topk) what this rank sent."""
        c = self.cfg
        if c.compress == "topk":
            return sparse_all_reduce_mean(x, group, counter, c.topk_fraction, c.topk_chunk, c.topk_bits, "diloco",
                                          per_sender=c.topk_average == "senders")
        if c.quant_bits:
            return quantized_all_reduce_mean(x, group, counter, c.quant_bits, c.quant_block, "diloco"), None
        mean = x.clone()
        counter.all_reduce(mean, group, "diloco")
        return mean / group_size(group), None

    def _expert_masks(self, f: int, touched: torch.Tensor, group, counter: Comm):
        """expert_sparse: from the rows this worker trained, over fragment f's flat vector: which values cross
        (every non-expert value; an expert row's if some worker trained it), which are this worker's to send,
        and the divisor of each crossing value's sum (the workers that trained its row; all for the rest).
        One all-reduce of a count per row."""
        counts = touched.to(torch.int32)
        if group is not None:
            counts = counts.to(group_device(group) or counts.device)
            counter.all_reduce(counts, group, "diloco")
        counts = counts.to(touched.device)
        n = self.global_copy[f].numel()
        keep = torch.ones(n, dtype=torch.bool, device=touched.device)
        mine, denom = keep.clone(), torch.full((n,), float(group_size(group)), device=touched.device)
        start = 0
        for _, offset, rows, per_row in self.expert_rows[f]:
            span = slice(offset, offset + rows * per_row)
            c = counts[start:start + rows]
            keep[span] = (c > 0).repeat_interleave(per_row)
            mine[span] = touched[start:start + rows].repeat_interleave(per_row)
            denom[span] = c.clamp(min=1).float().repeat_interleave(per_row)
            start += rows
        return keep, mine.float(), denom[keep], counts

    def _mark_touched(self) -> None:
        """expert_sparse, after each step: the expert rows with a non-zero gradient (tokens reached them)."""
        for rows, touched in zip(self.expert_rows, self.touched, strict=True):
            start = 0
            for p, _, n, _ in rows:
                if p.grad is not None:
                    touched[start:start + n] |= local_part(p.grad).reshape(n, -1).ne(0).any(dim=1)
                start += n

    def _exchange_on_stream(self, deltas: list[torch.Tensor], pend: _Pending) -> None:
        """The exchange thread on a GPU: the thread's device set to the training's, the collectives issued
        on a stream of its own after the deltas are ready (`pend.ready`), and `pend.done` the event after
        the last of them. Memory crossing the two streams is recorded on both, so the caching allocator
        reuses none of it early."""
        torch.cuda.set_device(self.device)
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_event(pend.ready)
        for d in deltas:
            d.record_stream(self._stream)
        with torch.cuda.stream(self._stream):
            self._exchange(deltas, pend)
            done = torch.cuda.Event()
            done.record(self._stream)
        for t in [*pend.result, *pend.bias_mean]:
            t.record_stream(main)
        pend.done = done

    def start(self, step: int) -> int:
        """Elastic: joins the outer group (once every expected worker is there, or after timeout_s)
        and takes the global state if another member is further along. Returns the step to go on from."""
        if self.membership is None:
            return step
        return self._reform(step, failed=False, member=False)

    def _reform(self, step: int, failed: bool, member: bool = True) -> int:
        m = self.membership
        if failed:
            log.warning("DiLoCo: a worker left the outer group at step %d; re-forming it", step)
        while True:
            left, joined = m.form(member=member)
            if not member:
                log.info("DiLoCo: worker %d in the outer group with workers %s (epoch %d)", m.worker, m.members,
                         m.epoch)
            self.left += len(left)
            self.joined += len(joined)
            if left:
                log.warning("DiLoCo: worker(s) %s left at step %d; continuing with workers %s (epoch %d)",
                            left, step, m.members, m.epoch)
            if joined:
                log.info("DiLoCo: worker(s) %s joined at step %d; workers %s (epoch %d)", joined, step,
                         m.members, m.epoch)
            try:
                return self._agree(step)
            except RuntimeError as err:  # a member went away while the group agreed: once more without it
                log.warning("DiLoCo: the outer group of epoch %d broke while agreeing (%s); re-forming it", m.epoch,
                            str(err).splitlines()[0][:200])
                member = True

    def _digest(self) -> float:
        return float(sum(g.double().sum() + 0.5 * m.double().sum() + 0.25 * b.double().sum()
                         for g, m, b in zip(self.global_copy, self.momentum, self.global_bias, strict=True)))

    def _rows(self, step: int, group) -> torch.Tensor:
        """Every worker's (step, outer steps, digest, was a member), each row written by its own worker
        (an all-gather, no sum a peer could skew) and, with a secret, signed: a row that does not verify
        raises StateMismatch (someone inside the outer group without the secret)."""
        m = self.membership
        mine = [float(step), float(self.outer_steps), self._digest(), float(self.was_member)]
        texts = [f"{m.run}/e{m.epoch}/row/w{w}" for w in m.members]
        row = torch.tensor(mine + m.signer.row_mac(f"{texts[group.rank]}:{mine!r}"), dtype=torch.float64)
        out = torch.zeros(group.size * row.numel(), dtype=torch.float64)
        self.comm.all_gather_into_tensor(out, row, group, "diloco_join")
        out = out.view(group.size, row.numel())
        for i, text in enumerate(texts):
            values = out[i, :4].tolist()
            if out[i, 4:].tolist() != [float(b) for b in m.signer.row_mac(f"{text}:{values!r}")]:
                raise StateMismatch(f"DiLoCo: the election row of worker {m.members[i]} in epoch {m.epoch} does "
                                    f"not verify under diloco.secret_file; not agreeing with it")
        return out[:, :4]

    def _agree(self, step: int) -> int:
        """After a (re)form: the leader (`choose_lead`: a worker that was a member before, furthest along)
        sends its state to every member whose (step, outer steps, digest) differ from its own; a receiver
        whose digest then differs from the leader's raises StateMismatch instead of contributing."""
        group = self.group
        if group is None:
            self.was_member = True
            return step
        rows = self._rows(step, group)
        self.was_member = True
        m = self.membership
        lead = choose_lead(rows, [m.members.index(w) for w in m.previous])
        differs = (rows[:, :3] != rows[lead, :3]).any(dim=1)
        if not differs.any():
            return step
        meta = torch.tensor([step, self.outer_steps, *self.last_sync], dtype=torch.int64)
        state = torch.cat([*self.global_copy, *self.momentum, *self.global_bias]).cpu()
        self.comm.broadcast(meta, lead, group, "diloco_join")
        self.comm.broadcast(state, lead, group, "diloco_join")
        if not differs[group.rank]:
            return step
        device = self.global_copy[0].device
        sizes, n = [g.numel() for g in self.global_copy], len(self.global_copy)
        parts = state.to(device).split(sizes + sizes + [b.numel() for b in self.global_bias])
        self.global_copy = [p.clone() for p in parts[:n]]
        self.momentum = [p.clone() for p in parts[n:2 * n]]
        self.global_bias = [p.clone() for p in parts[2 * n:]]
        self.outer_steps, self.last_sync = int(meta[1]), [int(v) for v in meta[2:]]
        if self._digest() != rows[lead, 2].item() or meta[:2].tolist() != rows[lead, :2].long().tolist():
            # what arrived is not what the leader holds
            raise StateMismatch(f"DiLoCo: worker {self.membership.worker}'s state digest {self._digest()!r} differs "
                                f"from the leader's {rows[lead, 2].item()!r} after the hand-over; not joining")
        self.pending = []
        self.error = [torch.zeros_like(e) for e in self.error]  # its own unsent progress left with its old weights
        self.touched = [torch.zeros_like(t) for t in self.touched]
        for f, (g, b) in enumerate(zip(self.global_copy, self.global_bias, strict=True)):
            self._write(f, g)
            self._write_bias(f, b)
        lead_worker = self.membership.members[lead]
        log.info("DiLoCo: took the global state of worker %d (step %d -> %d, %d outer steps)", lead_worker, step,
                 int(meta[0]), self.outer_steps)
        return int(meta[0])

    def after_step(self, step: int) -> int:
        """Called after inner step `step`; returns the step the loop is at (elastic: a worker that just
        took a peer's state is at the peer's step)."""
        if self.cfg.expert_sparse:
            self._mark_touched()
        for p in [p for p in self.pending if p.apply_at == step]:
            self.pending.remove(p)
            new = self._apply(p, step)
            if new != step:
                return new
        fragments = self.fragments_starting(step)
        if not fragments:
            return step
        deltas = [self.global_copy[f] - self._flat(f) for f in fragments]
        pend = _Pending(fragments, step + self.cfg.overlap, None, [], [self._bias(f) for f in fragments], [])
        if self.cfg.expert_sparse:  # the rows trained since each fragment's last exchange began; counting anew
            pend.touched = [self.touched[f].clone() for f in fragments]
            for f in fragments:
                self.touched[f].zero_()
        if self.cfg.overlap == 0:
            self._exchange(deltas, pend)
            return self._apply(pend, step)
        target = self._exchange
        if self.device.type == "cuda":  # its own stream: the training stream waits only where the result is applied
            target = self._exchange_on_stream
            pend.ready = torch.cuda.Event()
            pend.ready.record()
        pend.thread = threading.Thread(target=target, args=(deltas, pend), daemon=True)
        pend.thread.start()
        self.pending.append(pend)
        return step

    @contextlib.contextmanager
    def global_weights(self):
        """Inside, the model holds the global copies (what the workers agree on); the local weights
        come back after."""
        saved = [(self._flat(f), self._bias(f)) for f in range(len(self.params))]
        for f, (g, b) in enumerate(zip(self.global_copy, self.global_bias, strict=True)):
            self._write(f, g)
            self._write_bias(f, b)
        try:
            yield
        finally:
            for f, (flat, bias) in enumerate(saved):
                self._write(f, flat)
                self._write_bias(f, bias)

    def finish(self) -> None:
        """End of training: applies the exchanges still in flight (a thread must not outlive the run);
        elastic workers do not re-form any more."""
        for p in self.pending:
            self._apply(p, p.apply_at, reform=False)
        self.pending = []

    def _apply(self, pend: _Pending, step: int, reform: bool = True) -> int:
        if pend.thread is not None:
            pend.thread.join()
            pend.thread = None
        if pend.done is not None:  # a GPU exchange: the training stream waits for it here, not before
            torch.cuda.current_stream(self.device).wait_event(pend.done)
        if pend.error is not None:
            raise RuntimeError(f"DiLoCo: the exchange of fragments {pend.fragments} failed: {pend.error}") \
                from pend.error
        failed, want = pend.failed, pend.want
        if self.membership is not None and self.worker_group is not None:
            flags = self.comm.all_reduce_ints([int(failed), int(want)], self.worker_group, "control",
                                              op=torch.distributed.ReduceOp.MAX)  # every rank of this worker acts alike
            failed, want = bool(flags[0]), bool(flags[1])
        if not failed:
            self._outer_step(pend)
        else:  # expert_sparse: the rows trained in the failed window still hold unsent progress
            for f, touched in zip(pend.fragments, pend.touched, strict=False):
                self.touched[f] |= touched
        if self.membership is not None and reform and (failed or want):
            return self._reform(step, failed)
        return step

    def _outer_step(self, pend: _Pending) -> None:
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
        for f, residual in zip(pend.fragments, pend.residual, strict=False):  # sent: kept only what was not
            self.error[f] = residual
        for f, start, mean in zip(pend.fragments, pend.bias_start, pend.bias_mean, strict=False):
            self.global_bias[f] = mean.clone()
            # with overlap, the bias steps this worker took since the exchange started are kept
            self._write_bias(f, mean if c.overlap == 0 else self._bias(f) + (mean - start))

    def stats(self, step: int) -> dict:
        out = {"outer_steps": self.outer_steps, "bytes_last_sync": self.bytes_last_sync,
               "seconds_last_sync": round(self.seconds_last_sync, 4),
               "staleness": [step - s for s in self.last_sync]}
        if self.cfg.expert_sparse:
            out["expert_rows_sent"], out["expert_rows"] = self.expert_rows_last_sync
        if self.membership is not None:
            out.update(workers=len(self.membership.members), epoch=self.membership.epoch, left=self.left,
                       joined=self.joined, detached=self.membership.detached)
        return out

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
                "global_bias": self.global_bias, "local_bias": [self._bias(f) for f in range(len(self.params))],
                "last_sync": self.last_sync,
                "pending": [(p.fragments, p.apply_at, p.result, p.bias_start, p.bias_mean, p.failed, p.want,
                             p.residual) for p in self.pending],
                "error": self.error, "touched": self.touched,
                "inner": [{k: local_part(v).clone() if isinstance(v, torch.Tensor) else v
                           for k, v in optimizer.state.get(p, {}).items()} for ps in self.params for p in ps]}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        self.global_copy = [t.clone() for t in state["global_copy"]]
        self.momentum = [t.clone() for t in state["momentum"]]
        self.outer_steps, self.last_sync = state["outer_steps"], list(state["last_sync"])
        self.global_bias = [t.clone() for t in state["global_bias"]]
        self.pending = [_Pending(list(fs), at, None, [r.clone() for r in rs], list(start), list(mean), failed, want,
                                 residual=[r.clone() for r in rest[0]] if rest else [])
                        for fs, at, rs, start, mean, failed, want, *rest in state["pending"]]
        if self.touched and state.get("touched"):
            self.touched = [t.clone() for t in state["touched"]]
        if self.error and state.get("error"):  # a dense run's checkpoint: nothing unsent, the feedback starts at 0
            self.error = [t.clone() for t in state["error"]]
        for f, (flat, bias) in enumerate(zip(state["local"], state["local_bias"], strict=True)):
            self._write(f, flat)
            self._write_bias(f, bias)
        params = [p for ps in self.params for p in ps]
        with torch.no_grad():
            for p, saved in zip(params, state["inner"], strict=True):
                for k, v in saved.items():
                    current = optimizer.state[p].get(k)
                    if isinstance(current, torch.Tensor):
                        local_part(current).copy_(v)
                    else:
                        optimizer.state[p][k] = v
