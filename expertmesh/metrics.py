"""Rank 0's metrics: one printed line, one JSON record in runs/<name>/metrics.jsonl, one W&B log.

The record schema is documented in docs/metrics.md. W&B runs only on rank 0, in the mode
the config names (`offline` by default); its run id is stored in the run directory, so a resumed
run appends to the same W&B run instead of starting a new one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path

from expertmesh.config import JobConfig

log = logging.getLogger("expertmesh")
WANDB_ID_FILE = "wandb_run_id"


def moe_layer_stats(expert_load: list[list[int]]) -> list[dict]:
    """Per MoE layer, from its tokens per expert over a window: imbalance as max/mean and as the coefficient
    of variation (population std / mean), and the dead experts (no token in the window)."""
    out = []
    for layer in expert_load:
        n = len(layer)
        mean = sum(layer) / n if n else 0.0
        std = (sum((v - mean) ** 2 for v in layer) / n) ** 0.5 if n else 0.0
        out.append({"max_mean": max(layer) / mean if mean else 0.0, "cv": std / mean if mean else 0.0,
                    "dead": sum(1 for v in layer if v == 0)})
    return out


def _fmt_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f}B"
    for unit in ("KB", "MB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f}{unit}"
    return f"{n / 1024:.1f}GB"


def format_line(rec: dict, total_steps: int) -> str:
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}"]
    if rec.get("eval_loss") is not None:
        parts.append(f"eval {rec['eval_loss']:.4f}")
    parts += [
        f"lr {rec['lr']:.2e}",
        f"tok/s {rec['tokens_per_s']:.0f}",
        f"aux {rec['aux_loss']:.3f}",
        f"dropped {rec['dropped_tokens']}",
        f"comm {_fmt_bytes(sum(rec['comm_bytes_per_step'].values()))}/step",
    ]
    if "draft_head" in rec:  # the in-loop draft head: its loss and top-1 agreement with the target (first step)
        parts.append(f"head {rec['draft_head']['loss']:.3f} top1 {rec['draft_head']['top1_by_step'][0]:.2f}")
    return " | ".join(parts)


class Metrics:
    def __init__(self, cfg: JobConfig, run_path: Path, is_rank0: bool) -> None:
        self.cfg, self.run_path, self.is_rank0 = cfg, run_path, is_rank0
        self.wandb_run = None
        if not is_rank0:
            return
        run_path.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_path / "metrics.jsonl").open("a")
        if cfg.metrics.wandb_mode != "disabled":
            self.wandb_run = self._init_wandb()

    def _init_wandb(self):
        import wandb

        id_file = self.run_path / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        os.environ.setdefault("WANDB_SILENT", "true")
        # W&B mirrors metrics.jsonl; it must never stop training. A resumed run can find its id still
        # held by the previous attempt's W&B service for a moment: retry, then go on without W&B.
        for attempt in range(4):
            try:
                run = wandb.init(project=self.cfg.metrics.wandb_project, name=self.cfg.train.name, id=run_id,
                                 resume="allow", dir=str(self.run_path), mode=self.cfg.metrics.wandb_mode,
                                 config=self.cfg.to_dict())
                id_file.write_text(run_id + "\n")
                return run
            except Exception as e:  # wandb raises its own exception types
                error = e
                time.sleep(5 * (attempt + 1))
        log.warning("W&B run %s could not be started (%s); continuing without W&B, metrics.jsonl is complete",
                    run_id, error)
        return None

    def log(self, rec: dict) -> None:
        if not self.is_rank0:
            return
        log.info(format_line(rec, self.cfg.train.steps))
        self.write(rec)
        if self.wandb_run is not None:
            flat = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and v is not None}
            flat.update({f"comm/{k}": v for k, v in rec["comm_bytes_per_step"].items()})
            for i, (layer, load) in enumerate(zip(rec.get("moe_layers", []), rec.get("expert_load", []), strict=True)):
                flat.update({f"moe/layer{i}/{k}": v for k, v in layer.items()})
                flat.update({f"moe/layer{i}/tokens_expert{j}": v for j, v in enumerate(load)})
            if "diloco" in rec:
                d = rec["diloco"]
                flat.update({"diloco/outer_steps": d["outer_steps"], "diloco/bytes_last_sync": d["bytes_last_sync"],
                             **{f"diloco/staleness_{i}": v for i, v in enumerate(d["staleness"])}})
            if "draft_head" in rec:
                h = rec["draft_head"]
                flat.update({"draft_head/loss": h["loss"], "draft_head/lr": h["lr"],
                             "draft_head/step_share": h.get("step_share", 0.0),
                             **{f"draft_head/loss_step{j}": v for j, v in enumerate(h["loss_by_step"])},
                             **{f"draft_head/top1_step{j}": v for j, v in enumerate(h["top1_by_step"])}})
            if "fssdp" in rec:
                f = rec["fssdp"]
                flat.update({"fssdp/reshards": f["reshards"],  # per MoE layer, named by its layer index
                             **{f"fssdp/load_max_over_mean_{i}": v for i, v in zip(f["layers"], f["load_max_over_mean"],
                                                                                   strict=True)},
                             **{f"fssdp/replicas_{i}": v for i, v in zip(f["layers"], f["replicas"], strict=True)}})
            self.wandb_run.log(flat, step=rec["step"])

    def write(self, rec: dict) -> None:
        """A record into metrics.jsonl only (no line printed, no W&B)."""
        if self.is_rank0:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()

    def log_distill(self, rec: dict) -> None:
        """A window of online distillation (`expertmesh distill`): printed, metrics.jsonl, W&B `distill/*`
        at step = requests answered so far."""
        if not self.is_rank0:
            return
        log.info(f"requests {rec['requests']} | alpha {rec['alpha']:.3f} | accepted/drafted "
                 f"{rec['accepted_per_drafted']:.3f} | tokens/target fwd {rec['tokens_per_target_forward']:.2f} | "
                 f"draft v{rec['draft_version']} ({rec['draft_updates']} updates) | buffer {rec['buffer']}")
        self.write(rec)
        if self.wandb_run is not None:
            keys = ("alpha", "accepted_per_drafted", "mean_accepted_len", "tokens_per_target_forward")
            flat = {f"distill/{k}": rec[k] for k in keys + ("draft_updates", "buffer", "distill_loss")}
            flat.update({f"distill/acceptance_position{i}": v for i, v in enumerate(rec["acceptance_by_position"])})
            for domain, d in rec["domains"].items():
                flat.update({f"distill/{domain}/{k}": d[k] for k in keys})
            self.wandb_run.log(flat, step=rec["requests"])

    def log_eval(self, step: int, eval_loss: float) -> None:
        if not self.is_rank0:
            return
        log.info(f"step {step}/{self.cfg.train.steps} | eval {eval_loss:.4f}")
        self.write({"kind": "eval", "step": step, "time": time.time(), "eval_loss": eval_loss})
        if self.wandb_run is not None:
            self.wandb_run.log({"eval_loss": eval_loss}, step=step)

    def close(self) -> None:
        if not self.is_rank0 or self.jsonl.closed:
            return
        self.jsonl.close()
        if self.wandb_run is not None:
            # A stop signal arriving now (Slurm follows a requeue with SIGTERM) must not cut the flush
            # short: an unfinished W&B run stays locked and the resumed job could not reopen it.
            previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                self.wandb_run.finish()
            finally:
                signal.signal(signal.SIGTERM, previous)
            self.wandb_run = None
