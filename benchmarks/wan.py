"""Training over a slow link: tokens/s, compute utilization and bytes per step against the link's rate.

Two sites x 2 ranks (benchmarks/wanlab.py: network namespaces, a veth link shaped by `tc tbf` on both
ends, one torchrun agent per site over the link), the default model, `--steps` steps per run; tokens/s
is the rate of the last `--window` steps (the run's own metrics). Methods:
  ddp            gradients all-reduced over all 4 ranks every step (`parallel.dp_shard=false`)
  diloco-4bit    Streaming DiLoCo, a worker per site (H=8, 2 fragments, overlap 1, 4-bit), DDP inside a site
  diloco-topk    the same with SparseLoCo's exchange (`diloco.compress="topk"`: 1.56% of each chunk at 2 bits,
                 error feedback in place of outer momentum, outer lr 1)
Compute utilization is a method's tokens/s over its own tokens/s on the unshaped link, measured in the same
sweep. Bytes over the link per step come from the link's own counters (both ends' transmitted Ethernet
frames) and, for the DiLoCo methods, from our counters (rank 0's `diloco` bytes, x2 ranks per site, x2
sites: every rank's outer exchange crosses the link); the link adds TCP/IP headers, acknowledgements and
the run's setup and control traffic. The held-out loss is the run's final evaluation.

    sudo .venv/bin/python benchmarks/wan.py [--rates 1000,200,50,10,2,1,0.5] [--methods ddp,diloco-4bit,...]

Needs root and iproute2; refuses in one line otherwise. A PNG of utilization against bandwidth is written
beside the JSON when matplotlib is importable.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from wanlab import Lab, LabUnavailable, available, counted_bytes

DILOCO = ["parallel.dp_replicate=2", "parallel.dp_shard=false", "diloco.enabled=true", "diloco.sync_every=8",
          "diloco.fragments=2", "diloco.overlap=1"]
METHODS = {
    "ddp": ["parallel.dp_shard=false"],
    "diloco-4bit": [*DILOCO, "diloco.quant_bits=4"],
    "diloco-topk": [*DILOCO, 'diloco.compress="topk"', "diloco.outer_momentum=0.0", "diloco.outer_lr=1.0"],
}
# below these rates a method's run would take minutes per step: it is not run there (reported as skipped)
SLOWEST = {"ddp": 50.0, "diloco-4bit": 1.0, "diloco-topk": 0.1}


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def one_run(lab: Lab, tmp: Path, method: str, rate: float | None, steps: int, window: int, model: list[str],
            port: int) -> dict:
    name = f"{method}-{rate or 'unshaped'}".replace(".", "_")
    overrides = [f'train.run_dir="{tmp}"', f"train.name={name}", f"train.steps={steps}",
                 f"metrics.log_every={window}", "checkpoint.enabled=false", 'metrics.wandb_mode="disabled"',
                 "train.eval_batches=4", *model, *METHODS[method]]
    lab.shape(rate)
    before = lab.link_bytes()
    t0 = time.monotonic()
    logs = tmp / f"{name}.log"
    with logs.open("w") as log:
        procs = lab.launch(overrides, nproc=2, port=port, stdout=log, stderr=subprocess.STDOUT)
        codes = [p.wait(timeout=3600) for p in procs]
    wall = time.monotonic() - t0
    after = lab.link_bytes()
    if any(codes):
        tail = "\n".join(logs.read_text().splitlines()[-30:])
        raise RuntimeError(f"{name}: exit codes {codes}; last lines:\n{tail}")
    train, evals = _records(tmp / name)
    link = sum(after[s] - before[s] for s in after)
    diloco_bytes = counted_bytes(tmp / name, "diloco")
    return {"case": "2 sites x 2 ranks" + ("" if rate is None else f", {rate} Mbit/s"), "impl": method,
            "rate_mbit": rate, "tokens_per_s": train[-1]["tokens_per_s"], "wall_s": wall,
            "link_bytes_per_step": link / steps,
            "counted_cross_site_bytes_per_step": 4 * diloco_bytes / steps if method != "ddp" else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None, "steps": steps}


def bandwidth_at(rows: list[dict], share: float) -> float | None:
    """The lowest rate measured at which utilization is still >= share (rates below all failing)."""
    ok = [r["rate_mbit"] for r in rows if r["rate_mbit"] is not None and r["utilization"] >= share]
    return min(ok) if ok else None


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = sorted((r["rate_mbit"], r["utilization"]) for r in rows if r["impl"] == method and r["rate_mbit"])
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("link rate (Mbit/s)")
    ax.set_ylabel("compute utilization")
    ax.axhline(0.9, color="gray", linestyle=":")
    ax.legend()
    ax.set_title("2 sites x 2 ranks over a shaped link")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    def extra(p):
        p.add_argument("--rates", default="1000,200,50,10,2,1,0.5", help="link rates in Mbit/s (unshaped always)")
        p.add_argument("--methods", default=",".join(METHODS))
        p.add_argument("--steps", type=int, default=40)
        p.add_argument("--window", type=int, default=10, help="tokens/s over the last this many steps")

    args = benchlib.parse_args(__doc__, extra)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed sweep still removes its namespaces
    why = available()
    if why:
        raise SystemExit(f"wan.py: {why}")
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: no method named {sorted(unknown)}; the methods are {list(METHODS)}")
    rates = [float(r) for r in args.rates.split(",") if r]
    steps, window, model = args.steps, args.window, []
    if args.quick:
        methods, rates, steps, window = ["diloco-topk"], [2.0], 16, 8
        model = ["model.dim=64", "model.n_layers=2", "data.seq_len=64", "data.max_bytes=300000"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        port = 29511
        for method in methods:
            for rate in [None, *rates]:
                if rate is not None and rate < SLOWEST[method]:
                    continue
                port += 1
                row = one_run(lab, Path(tmp), method, rate, steps, window, model, port)
                print(json.dumps(row), flush=True)
                rows.append(row)
    base = {r["impl"]: r["tokens_per_s"] for r in rows if r["rate_mbit"] is None}
    for r in rows:
        r["utilization"] = r["tokens_per_s"] / base[r["impl"]]
    claims = []
    at90 = {m: bandwidth_at([r for r in rows if r["impl"] == m], 0.9) for m in methods}
    if at90.get("diloco-4bit") and at90.get("diloco-topk"):
        claims.append({"metric": "bandwidth for 90% utilization, streaming 4-bit / streaming topk",
                       "value": at90["diloco-4bit"] / at90["diloco-topk"], "op": ">=", "target": 8.0})
    at2 = {r["impl"]: r for r in rows if r["rate_mbit"] == 2.0}
    if "diloco-topk" in at2:
        claims.append({"metric": "compute utilization at 2 Mbit/s, streaming topk", "op": ">=", "target": 0.9,
                       "value": float(at2["diloco-topk"]["utilization"])})
        if "ddp" in base:
            claims.append({"metric": "tokens/s at 2 Mbit/s, streaming topk / unshaped DDP", "op": ">=", "target": 0.85,
                           "value": at2["diloco-topk"]["tokens_per_s"] / base["ddp"]})
    out = benchlib.write("wan", {"sites": 2, "ranks_per_site": 2, "steps": steps, "window": window, "rates": rates,
                                 "methods": methods, "model_overrides": model, "quick": args.quick}, rows, claims,
                         out=args.out, threads=1, extra={"bandwidth_for_90pct_mbit": at90})
    png = out.with_suffix(".png")
    if plot(rows, png):
        print(f"wrote {png}")


if __name__ == "__main__":
    try:
        main()
    except LabUnavailable as err:
        raise SystemExit(f"wan.py: {err}") from None
