"""`expertmesh report RUN_DIR`: plots and a short summary of a run, from its metrics.jsonl.

Writes RUN_DIR/report/{loss,throughput,comm,expert_load,imbalance}.png for a training run, acceptance.png for an
`expertmesh distill` run (with tau.png and acceptance_by_position.png; 800x450 px), and
RUN_DIR/report/summary.md, and logs the same images to the run's W&B run when it has one.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from expertmesh.config import ConfigError

SIZE, DPI = (8, 4.5), 100


def load_records(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, eval, distill) records; distill = `expertmesh distill`'s windows, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
    by_step: dict[tuple[str, int], dict] = {}
    distill = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "distill":
            distill.append(rec)
        elif "step" in rec:
            by_step[(rec["kind"], rec["step"])] = rec  # a step logged before a restart and after: keep the later
    records = sorted(by_step.values(), key=lambda r: r["step"])
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"], distill


def _figure(title: str, xlabel: str = "step", ylabel: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_loss(train, evals, out: Path) -> Path:
    plt, fig, ax = _figure("loss", ylabel="cross-entropy (nats/token)")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.legend()
    return _save(plt, fig, out / "loss.png")


def plot_throughput(train, out: Path) -> Path:
    plt, fig, ax = _figure("throughput", ylabel="tokens/s (all ranks)")
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    return _save(plt, fig, out / "throughput.png")


def plot_comm(train, out: Path) -> Path:
    plt, fig, ax = _figure("bytes sent per step by rank 0", ylabel="MB/step")
    labels = sorted({k for r in train for k in r["comm_bytes_per_step"]})
    for label in labels:
        ax.plot([r["step"] for r in train], [r["comm_bytes_per_step"].get(label, 0) / 1e6 for r in train], label=label)
    if labels:
        ax.legend()
    return _save(plt, fig, out / "comm.png")


def plot_expert_load(train, out: Path) -> Path | None:
    """One heatmap per MoE layer: experts down, logging windows across, colour = share of the
    layer's tokens (1/E everywhere means perfectly balanced)."""
    loads = [r["expert_load"] for r in train if r.get("expert_load")]
    if not loads:
        return None
    import numpy as np

    n_layers = len(loads[0])
    plt, fig, _ = _figure("expert load")
    fig.clf()
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    steps = [r["step"] for r in train if r.get("expert_load")]
    for i, ax in enumerate(axes):
        m = np.array([rec[i] for rec in loads], dtype=float).T  # [E, windows]
        m = m / np.maximum(m.sum(0, keepdims=True), 1)
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(steps[0], steps[-1], m.shape[0] - 0.5, -0.5))
        ax.set_title(f"MoE layer {i}", fontsize=9)
        ax.set_xlabel("step")
        if i == 0:
            ax.set_ylabel("expert")
    fig.colorbar(im, ax=list(axes), label="share of tokens")
    fig.suptitle("expert load")
    fig.savefig(out / "expert_load.png", dpi=DPI)
    plt.close(fig)
    return out / "expert_load.png"


def plot_imbalance(train, out: Path) -> Path | None:
    """Each MoE layer's imbalance (max/mean tokens per expert in each logging window) over time; dead
    experts are marked in the legend by their most recent count."""
    rows = [r for r in train if r.get("moe_layers")]
    if not rows:
        return None
    plt, fig, ax = _figure("MoE imbalance per layer", ylabel="max / mean tokens per expert")
    steps = [r["step"] for r in rows]
    for i in range(len(rows[0]["moe_layers"])):
        dead = rows[-1]["moe_layers"][i]["dead"]
        ax.plot(steps, [r["moe_layers"][i]["max_mean"] for r in rows],
                label=f"layer {i}" + (f" ({dead} dead)" if dead else ""))
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "imbalance.png")


def plot_acceptance(distill, out: Path) -> Path | None:
    """Acceptance rate per window of requests, overall and per domain, with the draft updates."""
    if not distill:
        return None
    plt, fig, ax = _figure("draft acceptance rate (per window of requests)", xlabel="requests answered",
                           ylabel="alpha")
    x = [r["requests"] for r in distill]
    ax.plot(x, [r["alpha"] for r in distill], "k-", label="all")
    for domain in sorted({d for r in distill for d in r["domains"]}):
        rows = [r for r in distill if domain in r["domains"]]
        ax.plot([r["requests"] for r in rows], [r["domains"][domain]["alpha"] for r in rows], "o--", label=domain)
    ax.legend()
    return _save(plt, fig, out / "acceptance.png")


def summary(run_dir: Path, train, evals, plots: list[Path], distill=()) -> str:
    lines = [f"# {run_dir.name}", ""]
    if distill:
        first, last = distill[0], distill[-1]
        lines += [f"- requests answered: {last['requests']} ({len(distill)} windows), draft updates: "
                  f"{last['draft_updates']}",
                  f"- alpha: first window {first['alpha']:.3f}, last window {last['alpha']:.3f}; tokens per target "
                  f"forward: first {first['tokens_per_target_forward']:.2f}, "
                  f"last {last['tokens_per_target_forward']:.2f}"]
    if train:
        last = train[-1]
        imbalance = [max(layer) / (sum(layer) / len(layer)) for layer in last.get("expert_load", []) if sum(layer)]
        lines += [
            f"- steps logged: {train[0]['step']}-{last['step']} ({len(train)} records)",
            f"- final train loss: {last['loss']:.4f}",
            f"- median tokens/s: {statistics.median(r['tokens_per_s'] for r in train):,.0f}",
            f"- bytes sent per step (rank 0, last window): {sum(last['comm_bytes_per_step'].values()) / 1e6:.2f} MB",
            f"- dropped tokens (last window): {last['dropped_tokens']}",
        ]
        if imbalance:
            lines.append(f"- expert load max/mean per layer (last window): {', '.join(f'{x:.2f}' for x in imbalance)}")
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        lines.append(f"- held-out loss: first {evals[0]['eval_loss']:.4f} (step {evals[0]['step']}), last "
                     f"{evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']}), best {best['eval_loss']:.4f} "
                     f"(step {best['step']})")
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    return "\n".join(lines)


def log_to_wandb(run_dir: Path, plots: list[Path]) -> bool:
    id_file = run_dir / "wandb_run_id"
    cfg_file = run_dir / "config.json"
    if not id_file.is_file() or not cfg_file.is_file():
        return False
    metrics_cfg = json.loads(cfg_file.read_text())["metrics"]
    if metrics_cfg["wandb_mode"] == "disabled":
        return False
    import wandb

    run = wandb.init(project=metrics_cfg["wandb_project"], id=id_file.read_text().strip(), resume="allow",
                     dir=str(run_dir), mode=metrics_cfg["wandb_mode"])
    run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in plots})
    run.finish()
    return True


def plot_tau(distill, out: Path) -> Path | None:
    """Tokens per target forward (accepted length + 1) per window of requests, overall and per domain."""
    if not distill:
        return None
    plt, fig, ax = _figure("tokens per target forward (per window of requests)", xlabel="requests answered",
                           ylabel="tau")
    ax.plot([r["requests"] for r in distill], [r["tokens_per_target_forward"] for r in distill], "k-", label="all")
    for domain in sorted({d for r in distill for d in r["domains"]}):
        rows = [r for r in distill if domain in r["domains"]]
        ax.plot([r["requests"] for r in rows], [r["domains"][domain]["tokens_per_target_forward"] for r in rows],
                "o--", label=domain)
    ax.legend()
    return _save(plt, fig, out / "tau.png")


def plot_acceptance_by_position(distill, out: Path) -> Path | None:
    """Acceptance rate of each draft position: the first and the last window, overall and per domain."""
    rows = [r for r in distill if r.get("acceptance_by_position")]
    if not rows:
        return None
    plt, fig, ax = _figure("acceptance by draft position", xlabel="draft position", ylabel="kept / reached")
    for name, r in (("first window", rows[0]), ("last window", rows[-1])):
        ax.plot(range(len(r["acceptance_by_position"])), r["acceptance_by_position"], "o-", label=name)
        for domain, d in sorted(r["domains"].items()):
            ax.plot(range(len(d["acceptance_by_position"])), d["acceptance_by_position"], ".--",
                    label=f"{name}, {domain}")
    ax.legend()
    return _save(plt, fig, out / "acceptance_by_position.png")


def report(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    train, evals, distill = load_records(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plots = [plot_loss(train, evals, out), plot_throughput(train, out), plot_comm(train, out)] if train else []
    plots += [p for p in (plot_expert_load(train, out), plot_imbalance(train, out), plot_acceptance(distill, out),
                          plot_tau(distill, out), plot_acceptance_by_position(distill, out)) if p is not None]
    (out / "summary.md").write_text(summary(run_dir, train, evals, plots, distill))
    log_to_wandb(run_dir, plots)
    return [*plots, out / "summary.md"]
