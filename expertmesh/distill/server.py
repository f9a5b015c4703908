"""`expertmesh distill`: serve requests with speculative decoding and distill the draft online.

    expertmesh distill --config configs/distill.toml [--nproc N] [key=value ...]

Roles. One process serves and trains (a laptop, a test). With N > 1 processes, ranks 0..T-1
(T = distill.trainers) train the draft and ranks T..N-1 serve: each server holds the target and a
copy of the draft and answers its share of the prompt stream (request i goes to server i mod (N-T)).
The ranks meet once per served batch (an "exchange"):
  server -> trainer   the batch's verification data (token ids + the target's top-k probabilities
                      at the chosen positions) and per-request statistics, point-to-point to
                      trainer (server index mod T)
  trainers            all-gather the requests' statistics (one update schedule for all); each
                      update averages the trainers' gradients (all-reduce), so drafts stay equal
  rank 0 -> all       a header [draft version, stop] and, when the version moved, the new draft
                      weights (broadcast; other trainers check theirs are identical); servers swap
                      them in between requests
With `distill.overlap` the trainer's update steps run while the servers decode the next batch, so
new weights reach the servers one exchange after the data that produced them.

Outputs in runs/<name>/: metrics.jsonl (rank 0: `distill` records per window of requests, a
`draft_update` record per new draft version with its digest, a final `distill_summary`),
responses-rank{R}.jsonl (one line per answered request; a prompt too long for the models gets an
`error` instead of tokens), swaps-rank{R}.jsonl (the version and
digest of every draft a server swapped in), and draft/ (the distilled draft, loadable as
`distill.draft`), or draft_head/ when the draft is a head (head_online.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from expertmesh import config as config_mod
from expertmesh.config import ConfigError, JobConfig
from expertmesh.dist.comm_stats import Comm, group_device
from expertmesh.dist.env import DistEnv, init_distributed, pick_device, set_threads
from expertmesh.distill.head import Acceptance, HeadTrace, Tree, head_generate
from expertmesh.distill.head_online import (
    HeadDistiller,
    HeadDraft,
    is_head,
    load_head_draft,
    save_head_draft,
    saved_progress,
    trace_examples,
)
from expertmesh.distill.models import load_lm, save_lm
from expertmesh.distill.online import (
    OnlineDistiller,
    Recorder,
    load_weights_vector,
    merge_on_path,
    weights_digest,
    weights_vector,
)
from expertmesh.distill.speculative import AdaptiveGamma, CostGamma, CostTree, measure_costs, speculative_generate
from expertmesh.distill.stream import Request, requests
from expertmesh.metrics import Metrics

log = logging.getLogger("expertmesh")


@dataclass
class RequestStats:
    id: str
    index: int
    domain: str
    draft_version: int
    drafted: int = 0
    accepted: int = 0
    alpha_sum: float = 0.0
    rounds: int = 0  # target forwards spent on this request
    emitted: int = 0
    # per draft position i: rounds that reached it (every draft before it accepted), and that accepted it
    reached: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)


def summarize(stats: list[RequestStats]) -> dict:
    rounds = sum(s.rounds for s in stats)
    return {
        "requests": len(stats),
        "alpha": sum(s.alpha_sum for s in stats) / max(rounds, 1),
        "accepted_per_drafted": sum(s.accepted for s in stats) / max(sum(s.drafted for s in stats), 1),
        "mean_accepted_len": sum(s.accepted for s in stats) / max(rounds, 1),
        "tokens_per_target_forward": sum(s.emitted for s in stats) / max(rounds, 1),
        "mean_gamma": sum(s.drafted for s in stats) / max(rounds, 1),  # drafts per round (adaptive rules move it)
        "acceptance_by_position": by_position(stats),
    }


def count_round(stats: list[RequestStats], drafted: int, accepted: list[int], alpha: list[float],
                depth: int | None = None) -> None:
    """One round into each request's statistics: `drafted` tokens per request, each one's accepted drafts and
    expected acceptance. Positions are depths: a chain's `drafted`, a tree's `depth`."""
    depth = drafted if depth is None else depth
    for s, a, al in zip(stats, accepted, alpha, strict=True):
        s.rounds += 1
        s.drafted += drafted
        s.accepted += a
        s.alpha_sum += al
        grow = depth - len(s.reached)
        s.reached += [0] * grow
        s.kept += [0] * grow
        for i in range(min(a + 1, depth)):  # depth i is tried when the i drafts before it were kept
            s.reached[i] += 1
            s.kept[i] += i < a


def by_position(stats: list[RequestStats]) -> list[float]:
    """The acceptance rate of each draft position, over the rounds that reached it."""
    n = max((len(s.reached) for s in stats), default=0)
    reached = [sum(s.reached[i] for s in stats if i < len(s.reached)) for i in range(n)]
    kept = [sum(s.kept[i] for s in stats if i < len(s.kept)) for i in range(n)]
    return [k / r if r else 0.0 for k, r in zip(kept, reached, strict=True)]


def summarize_by_domain(stats: list[RequestStats]) -> dict:
    out = summarize(stats)
    by: dict[str, list[RequestStats]] = defaultdict(list)
    for s in stats:
        by[s.domain].append(s)
    out["domains"] = {d: summarize(v) for d, v in sorted(by.items())}
    return out


class Server:
    """Answers requests: target + draft, speculative decoding, responses written as they finish."""

    def __init__(self, cfg: JobConfig, target, draft, tokenizer, stream, out: Path, rank: int,
                 device: torch.device, version: int = 0, resume: bool = False) -> None:
        g = cfg.distill
        self.cfg, self.target, self.draft, self.tokenizer = cfg, target, draft, tokenizer
        self.stream, self.device, self.rank = iter(stream), device, rank
        self.pending: Request | None = None
        self.gamma = AdaptiveGamma(g.gamma, g.gamma_min, g.gamma_max) if g.adaptive_gamma else g.gamma
        self.costs, self.tree_nodes = None, g.tree_nodes  # tree_nodes: a count, or a CostTree that sizes each tree
        if g.gamma_by_cost:  # measured here, on this rank's device, at the batch size it serves
            hi = g.tree_nodes or g.gamma_max
            self.costs = measure_costs(target, draft, g.batch_size, g.prompt_len, list(range(g.gamma_min + 1, hi + 2)),
                                       min(target.vocab_size, draft.vocab_size), device=device)
            if g.tree_nodes:
                self.tree_nodes = CostTree(self.costs, g.gamma_min, g.tree_nodes)
            else:
                self.gamma = CostGamma(self.costs, g.gamma_min, g.gamma_max, g.gamma)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"spec-costs-rank{rank}.json").write_text(json.dumps(self.costs) + "\n")
            log.info("verification costs at batch %d (seconds per pass of n tokens): %s; draft token %.2e s",
                     g.batch_size, {n: round(t, 5) for n, t in self.costs["verify_s"].items()}, self.costs["draft_s"])
        # a dynamic tree's values: greedy acceptance counted over this server's verifications
        self.acceptance = Acceptance() if g.tree_nodes and g.tree_value == "counted" else None
        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
        self.recorder = Recorder(g.positions, g.topk) if g.online else None
        self.version = version
        out.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"  # resume: answered_requests() already dropped any torn last line
        self.responses = (out / f"responses-rank{rank}.jsonl").open(mode)
        self.swaps = (out / f"swaps-rank{rank}.jsonl").open(mode)
        self.limit = min(target.max_positions, draft.max_positions)

    def next_batch(self) -> list[Request]:
        """Up to batch_size consecutive requests of one prompt length (decoded together in lockstep)."""
        batch: list[Request] = []
        while len(batch) < self.cfg.distill.batch_size:
            req = self.pending if self.pending is not None else next(self.stream, None)
            self.pending = None
            if req is None:
                break
            if (reason := self.invalid(req)) is not None:  # answered with an error, as a server would: raising
                self.refuse(req, reason)  # here would stop this rank and leave the others waiting
                continue
            if batch and len(req.tokens) != len(batch[0].tokens):
                self.pending = req
                break
            batch.append(req)
        return batch

    def invalid(self, req: Request) -> str | None:
        """Why a request cannot be decoded (a malformed line, a token past the vocabulary, too long), or None."""
        if req.error is not None:
            return req.error
        vocab = min(self.target.vocab_size, self.draft.vocab_size)
        if max(req.tokens) >= vocab:
            return f"token id {max(req.tokens)} is outside the models' vocabulary of {vocab}"
        g = self.cfg.distill
        longest = g.gamma_max if g.adaptive_gamma or g.gamma_by_cost else g.gamma
        if isinstance(self.draft, HeadDraft):  # a tree's nodes all sit in the target's cache while verified
            longest = g.tree_nodes or (len(Tree(g.tree).parent) - 1 if g.tree else longest)
            if len(req.tokens) < 2:
                return "a draft head needs prompts of at least 2 tokens (it starts from the target's features)"
        need = len(req.tokens) + g.max_new_tokens + longest + 1
        if need > self.limit:
            return (f"{len(req.tokens)} prompt tokens + distill.max_new_tokens={g.max_new_tokens} + drafts exceed "
                    f"the models' {self.limit} positions")
        return None

    def refuse(self, req: Request, reason: str) -> None:
        log.warning("request %s refused: %s", req.id, reason)
        self.responses.write(json.dumps({"id": req.id, "index": req.index, "domain": req.domain,
                                         "error": reason}) + "\n")
        self.responses.flush()

    def serve(self, batch: list[Request]) -> tuple[list, list[RequestStats]]:
        g = self.cfg.distill
        stats = [RequestStats(r.id, r.index, r.domain, self.version) for r in batch]
        recorder = self.recorder

        def on_round(seq, drafts, p, verdict):
            count_round(stats, drafts.shape[1], verdict.accepted_B.tolist(), verdict.alpha_B.tolist())
            if recorder is not None:
                recorder(seq, drafts, p, verdict)

        prompt = torch.tensor([r.tokens for r in batch], dtype=torch.int64, device=self.device)
        trace = None
        if isinstance(self.draft, HeadDraft):
            trace = HeadTrace(g.topk) if g.online else None
            out, _ = head_generate(self.target, self.draft.head, self.draft.layers, prompt, g.max_new_tokens,
                                   self.gamma,
                                   tree=g.tree or None, greedy=g.greedy, temperature=g.temperature,
                                   generator=self.generator, trace=trace,
                                   dynamic=(self.tree_nodes, g.tree_depth, g.tree_topk) if g.tree_nodes else None,
                                   acceptance=self.acceptance,
                                   on_round=lambda n, depth, acc, alpha: count_round(stats, n, acc, alpha, depth))
        else:
            out, _ = speculative_generate(self.target, self.draft, prompt, g.max_new_tokens, self.gamma,
                                          greedy=g.greedy, temperature=g.temperature, generator=self.generator,
                                          on_round=on_round)
        for r, s, tokens in zip(batch, stats, out.tolist(), strict=True):
            s.emitted = len(tokens)
            self.responses.write(json.dumps({"id": r.id, "index": r.index, "domain": r.domain,
                                             "draft_version": self.version, "tokens": tokens,
                                             "completion": self.tokenizer.decode(tokens), "rounds": s.rounds,
                                             "alpha": s.alpha_sum / max(s.rounds, 1),
                                             "accepted": s.accepted, "drafted": s.drafted}) + "\n")
        self.responses.flush()
        if trace is not None:
            examples = trace_examples(trace)
        else:
            examples = merge_on_path(recorder.take(), torch.cat([prompt, out], 1)) if recorder is not None else []
        return examples, stats

    def acceptance_table(self) -> dict | None:
        """This server's counted acceptance (`distill.tree_value = "counted"` with a dynamic tree), or None."""
        return self.acceptance.table() if self.acceptance is not None else None

    def swap(self, flat: torch.Tensor, version: int) -> None:
        load_weights_vector(self.draft, flat)
        self.version = version
        self.swaps.write(json.dumps({"version": version, "digest": weights_digest(self.draft)}) + "\n")
        self.swaps.flush()

    def close(self) -> None:
        self.responses.close()
        self.swaps.close()


class Trainer:
    """The draft's trainer: takes the servers' verification data, updates every I requests, numbers
    its draft versions; on rank 0 it also writes the metrics."""

    def __init__(self, cfg: JobConfig, draft, metrics: Metrics, group=None, offset: int = 0) -> None:
        g = cfg.distill
        self.cfg, self.draft, self.metrics, self.group = cfg, draft, metrics, group
        self.offset = offset  # requests answered by earlier attempts of this run
        self.acceptance: dict[int, dict] = {}  # serving rank -> its latest counted acceptance (`Acceptance.table`)
        self.saver = None  # rank 0: writes the draft to runs/<name>/draft
        kind = HeadDistiller if isinstance(draft, HeadDraft) else OnlineDistiller
        self.distiller = kind(draft, draft.vocab_size, kind=g.divergence, beta=g.beta, lr=g.lr,
                                         buffer=g.buffer, batch=g.update_batch, steps=g.update_steps,
                                         update_every=g.update_every, seed=cfg.train.seed)
        self.version = 0
        self.examples = 0  # examples received by all trainers (each keeps its own in its buffer)
        self.due = 0  # updates owed: one per update_every requests received
        self.window: list[RequestStats] = []
        self.all: list[RequestStats] = []
        self.start = time.time()

    def receive(self, examples: list, stats: list[RequestStats], examples_elsewhere: int = 0) -> None:
        """This trainer's examples, and the statistics of requests answered anywhere (every trainer sees
        them all, in the same order, so all keep the same update schedule)."""
        g = self.cfg.distill
        self.distiller.add(examples)
        self.examples += len(examples) + examples_elsewhere
        before = len(self.all) // g.update_every
        self.all.extend(stats)
        if g.online:
            self.due += len(self.all) // g.update_every - before
        for s in stats:
            self.window.append(s)
            if len(self.window) == g.window:
                self.log_window()

    def run_due(self) -> bool:
        """Takes the owed update steps (if there is data); True when the draft changed."""
        changed = False
        while self.due > 0:
            self.due -= 1
            if self.examples:
                self.distiller.update(self.group)
                changed = True
        if changed:
            self.version += 1
            self.metrics.write({"kind": "draft_update", "version": self.version, "updates": self.distiller.updates,
                                "requests": self.offset + len(self.all), "digest": weights_digest(self.draft),
                                "distill_loss": self.distiller.last_loss, "time": time.time()})
            every = self.cfg.distill.save_every
            if self.saver is not None and every and self.distiller.updates % every == 0:
                self.saver()
        return changed

    def state(self) -> dict:
        out = {"draft_updates": self.distiller.updates, "draft_version": self.version,
               "buffer": len(self.distiller.buffer), "distill_loss": self.distiller.last_loss}
        if self.acceptance:  # dynamic trees valued by counted acceptance: the servers' counts, by rank
            out["tree_acceptance"] = Acceptance.by_rank([self.acceptance[r] for r in sorted(self.acceptance)])
        return out

    def log_window(self) -> None:
        if not self.window:
            return
        rec = {"kind": "distill", "time": time.time(), **summarize_by_domain(self.window), **self.state()}
        rec["requests"], rec["window_requests"] = self.offset + len(self.all), len(self.window)
        self.metrics.log_distill(rec)
        self.window = []

    def finish(self) -> dict:
        self.log_window()
        rec = {"kind": "distill_summary", "time": time.time(), "seconds": time.time() - self.start,
               **summarize_by_domain(self.all), **self.state()}
        self.metrics.write(rec)
        return rec


def _valid_lines(path: Path) -> list[str]:
    """The complete JSON lines of a file that a crash may have cut mid-line."""
    out = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        out.append(line)
    return out


def answered_requests(run_path: Path, rank: int | None) -> set[int]:
    """Stream indices already answered by any server of an earlier attempt of this run. With `rank`,
    that server's own files lose a torn last line first (atomically), so appending continues cleanly."""
    if rank is not None:
        for name in (f"responses-rank{rank}.jsonl", f"swaps-rank{rank}.jsonl"):
            path = run_path / name
            if path.is_file():
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in _valid_lines(path)))
                os.replace(tmp, path)
    done: set[int] = set()
    for path in sorted(run_path.glob("responses-rank*.jsonl")):
        done.update(json.loads(line)["index"] for line in _valid_lines(path))
    return done


def run(cfg: JobConfig, env: DistEnv) -> dict:
    """Serves the whole stream; returns the summary record on rank 0 ({} elsewhere)."""
    g = cfg.distill
    device = pick_device(cfg.train.device, env)
    if env.world_size > 1 and env.world_size <= g.trainers:
        raise ConfigError(f"{env.world_size} processes leave no serving rank beside distill.trainers={g.trainers}")
    init_distributed(env, device)
    set_threads(cfg.train.threads, env)
    torch.manual_seed(cfg.train.seed)
    run_path = cfg.run_path
    comm = Comm()  # every collective below goes through it (the collective rule: dist/comm_stats.py)
    single = env.world_size == 1
    serving = single or env.rank >= g.trainers
    resume = cfg.checkpoint.resume and (run_path / "config.json").is_file()
    head = is_head(g.draft)
    saved = run_path / ("draft_head" if head else "draft")
    start = {"version": 0, "updates": 0}
    if resume and head:
        start = saved_progress(saved)
    elif resume and (saved / "distill.json").is_file():
        start = json.loads((saved / "distill.json").read_text())
    target, tokenizer = None, None
    if serving or head:  # a head's trainers need the target's embedding and LM head too
        target, tokenizer, _ = load_lm(g.target, device, "target")  # the servers' tokenizer is the target's
        target.requires_grad_(False)
    if head:
        draft, kind = load_head_draft(saved if start["version"] else g.draft, target, cfg, device), "head"
    else:
        draft, draft_tokenizer, kind = load_lm(saved if start["version"] else g.draft, device, "draft")
        tokenizer = tokenizer or draft_tokenizer
    if target is not None and target.vocab_size != draft.vocab_size:
        raise ConfigError(f"target vocabulary {target.vocab_size} != draft vocabulary {draft.vocab_size} "
                          f"({g.target}, {g.draft})")
    done = answered_requests(run_path, env.rank if serving else None) if resume else set()
    if not single:
        comm.barrier()  # every server has tidied its files before anyone reads them (rank 0: config below)
    if env.is_rank0:
        run_path.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, run_path / "config.json")
        if resume:
            log.info("resuming %s: %d requests already answered, draft version %d (%d updates)", run_path,
                     len(done), start["version"], start["updates"])
    metrics = Metrics(cfg, run_path, env.is_rank0)
    group = dist.new_group(list(range(g.trainers))) if not single and g.trainers > 1 else None  # every rank joins
    trainer = None
    if env.rank < g.trainers or single:
        trainer = Trainer(cfg, draft, metrics, group, offset=len(done))
        trainer.version, trainer.distiller.updates = start["version"], start["updates"]
        def save():
            progress = {"version": trainer.version, "updates": trainer.distiller.updates}
            if head:
                return save_head_draft(draft, saved, progress)
            return save_lm(draft, kind, g.draft, saved, trainer.distiller.updates, progress)

        trainer.saver = save if env.is_rank0 and g.online and g.save_draft else None
    server = None
    if serving:
        servers = 1 if single else env.world_size - g.trainers
        index = 0 if single else env.rank - g.trainers
        stream = (r for r in requests(g, tokenizer, cfg.train.seed, index, servers) if r.index not in done)
        server = Server(cfg, target, draft, tokenizer, stream, run_path, env.rank, device, start["version"], resume)
    if server is not None and server.costs is not None and env.is_rank0:
        metrics.write({"kind": "spec_costs", "time": time.time(), **server.costs})
    log.info("distill: %s, %d trainer(s), %d server(s), target %s, draft %s (%s), %s, online=%s",
             "one process" if single else f"{env.world_size} ranks", 1 if single else g.trainers,
             1 if single else env.world_size - g.trainers, g.target, g.draft, kind,
             "greedy" if g.greedy else f"T={g.temperature}", g.online)
    try:
        if single:
            while batch := server.next_batch():
                examples, stats = server.serve(batch)
                if server.acceptance is not None:
                    trainer.acceptance[env.rank] = server.acceptance_table()
                trainer.receive(examples, stats)
                if trainer.run_due():
                    server.version = trainer.version  # the same module: swapped by construction
        elif trainer is not None:
            _train_loop(trainer, env, g.trainers, g.overlap, comm)
        else:
            _serve_loop(server, env, g.trainers, comm)
        summary = trainer.finish() if trainer is not None else {}
        if trainer is not None and trainer.saver is not None:
            path = trainer.saver()
            log.info("distilled draft (version %d, %d updates) saved to %s", trainer.version,
                     trainer.distiller.updates, path)
        if summary:
            log.info("distill done: %d requests, alpha %.3f, accepted/drafted %.3f, tokens/target forward %.3f, "
                     "%d draft updates", summary["requests"], summary["alpha"], summary["accepted_per_drafted"],
                     summary["tokens_per_target_forward"], summary["draft_updates"])
        return summary
    finally:
        if server is not None:
            server.close()
        metrics.close()


def _train_loop(trainer: Trainer, env: DistEnv, trainers: int, overlap: bool, comm: Comm) -> None:
    wire = group_device(dist.group.WORLD)  # where the broadcasts' tensors live: the GPU under NCCL
    mine = [r for r in range(trainers, env.world_size) if (r - trainers) % trainers == env.rank]
    n_servers = env.world_size - trainers
    sent = trainer.version  # what the servers hold already: the saved draft on a resume, else version 0
    while True:
        if overlap:
            trainer.run_due()  # while the servers decode their next batch
        examples, stats, done, tables = [], [], 0, {}
        for src in mine:
            payload = comm.recv_object(src)
            examples += payload["examples"]
            stats += payload["stats"]
            done += payload["done"]
            tables[src] = payload["acceptance"]
        parts = [(stats, len(examples), done, tables)]
        if trainers > 1:  # every trainer learns every request's statistics: one update schedule for all
            parts = comm.all_gather_object((stats, len(examples), done, tables), trainer.group)
        for t, (st, n, _, tab) in enumerate(parts):
            trainer.acceptance.update({src: table for src, table in tab.items() if table is not None})
            trainer.receive(examples if t == env.rank else [], st, 0 if t == env.rank else n)
        done = sum(part[2] for part in parts)  # servers that have drained their share, all trainers' together
        if not overlap:
            trainer.run_due()
        stop = done == n_servers
        header = torch.tensor([trainer.version, int(stop)], dtype=torch.int64, device=wire)
        comm.broadcast(header, 0, dist.group.WORLD, "distill")
        if trainer.version != sent:
            flat = weights_vector(trainer.draft).to(wire)
            mine_flat = flat.clone() if env.rank else None
            comm.broadcast(flat, 0, dist.group.WORLD, "distill")
            if mine_flat is not None and not torch.equal(flat, mine_flat):
                raise RuntimeError(f"trainer rank {env.rank}'s draft differs from rank 0's at version "
                                   f"{trainer.version}: the trainers' updates diverged")
            sent = trainer.version
        if stop:
            return


def _serve_loop(server: Server, env: DistEnv, trainers: int, comm: Comm) -> None:
    wire = group_device(dist.group.WORLD)
    size = sum(p.numel() for p in server.draft.parameters())
    while True:
        batch = server.next_batch()
        examples, stats = server.serve(batch) if batch else ([], [])
        comm.send_object({"examples": examples, "stats": stats, "done": not batch,
                          "acceptance": server.acceptance_table()}, (env.rank - trainers) % trainers)
        header = torch.zeros(2, dtype=torch.int64, device=wire)
        comm.broadcast(header, 0, dist.group.WORLD, "distill")
        version, stop = int(header[0]), bool(header[1])
        if version != server.version:
            flat = torch.empty(size, dtype=torch.float32, device=wire)
            comm.broadcast(flat, 0, dist.group.WORLD, "distill")
            server.swap(flat, version)  # between requests: the batch above finished with the old draft
        if stop:
            return


