"""Training throughput of the default model, tokens/s per rank, as `make train` runs it.

Runs the default config through `expertmesh run --nproc 4` (torchrun, 4 gloo ranks, 1 thread each),
and in the same session measures the anchor: the fp32 matmul FLOP rate each of 4 concurrent
1-thread processes gets on this machine (the compute ceiling under the same contention). Reports
model FLOPs utilisation against it, the wall-clock of the run, and the drop in held-out loss.

Then `train.compile` on and off: the same default run for COMPILE_STEPS steps, eager and compiled
(inductor, C++ on CPU; --quick: aot_eager and a few steps), one after the other in the same session;
tokens/s of the windows after the first (which holds the compile time), and the compiled run's own count of
block forwards that ran compiled graphs (a run that fell back to eager would show it).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch

from expertmesh import config
from expertmesh.testing import spawn

NPROC = 4
COMPILE_STEPS = 100


def _matmul_rate(rank, world, m, k, n, seconds):
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - t0)


def train_flops_per_token(cfg: config.JobConfig) -> float:
    """3 x forward FLOPs: every matmul weight a token touches (top-k experts only) plus causal attention."""
    m, e, S = cfg.model, cfg.moe, cfg.data.seq_len
    D, L = m.dim, m.n_layers
    per_layer = 4 * D * D
    moe_layers = sum(1 for i in range(L) if (i + 1) % e.every == 0)
    matmul_params = L * per_layer + moe_layers * (D * e.num_experts + e.top_k * 3 * D * e.expert_dim
                                                  + 3 * D * e.shared_experts * e.expert_dim)
    matmul_params += (L - moe_layers) * 3 * D * m.ffn_dim + D * m.vocab_size
    attention = L * 2 * S * D  # QK^T and AV, causal: half of 2 * 2 * S * D
    return 3 * (2 * matmul_params + attention)


def _run(overrides: list[str], run_dir: str, name: str) -> tuple[list[dict], float]:
    """One `expertmesh run` of the default config; its metrics records and wall-clock seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "expertmesh.launch.cli", "run", "--nproc", str(NPROC),
                           "--config", "configs/default.toml", f"train.run_dir={run_dir}", f"train.name={name}",
                           *overrides], cwd=benchlib.ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"training run {name} failed:\n{proc.stderr[-4000:]}")
    lines = (Path(run_dir) / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], wall


def compile_rows(quick: bool, main_rate: float) -> tuple[list[dict], list[dict]]:
    """train.compile off and on, the default run otherwise; the compiled run's tokens/s against eager's.
    --quick (a smoke run) compiles only, against the main run's eager rate (`main_rate`)."""
    steps = 6 if quick else COMPILE_STEPS
    backend = "aot_eager" if quick else "inductor"
    common = [f"train.steps={steps}", "checkpoint.enabled=false", "metrics.wandb_mode=disabled",
              f"train.eval_every={steps}", "train.eval_batches=2", "metrics.log_every=2" if quick else "",
              "data.max_bytes=2000000" if quick else ""]
    common = [o for o in common if o]
    rows, rate = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            rate["eager"] = main_rate
        for mode in ("compiled",) if quick else ("eager", "compiled"):
            extra = [] if mode == "eager" else ["train.compile=true", f'train.compile_backend="{backend}"']
            records, wall = _run(common + extra, tmp, mode)
            train = [r for r in records if r["kind"] == "train"][1:]  # the first window holds warm-up / compiling
            rate[mode] = statistics.median(r["tokens_per_s_per_rank"] for r in train)
            row = {"case": f"default model, 4 ranks x 1 thread, {steps} steps", "impl": f"expertmesh {mode}"
                   + (f" ({backend})" if mode == "compiled" else ""), "tokens_per_s_per_rank": rate[mode],
                   "wall_clock_s": wall}
            if mode == "compiled":  # rank 0's counts over the timed windows
                c = [r["compile"] for r in train]
                row.update(block_forwards=sum(x["forwards"] for x in c),
                           compiled_forwards=sum(x["compiled_forwards"] for x in c), graphs=c[-1]["graphs"])
            rows.append(row)
    claims = [{"metric": f"train.compile ({backend}) tokens/s vs eager, default model", "op": ">=", "target": 1.0,
               "value": rate["compiled"] / rate["eager"]},
              {"metric": "block forwards that ran a compiled graph (fraction, timed windows)", "op": ">=",
               "target": 1.0, "value": rows[-1]["compiled_forwards"] / max(rows[-1]["block_forwards"], 1)}]
    return rows, claims


def main() -> None:
    args = benchlib.parse_args(__doc__)
    steps = 12 if args.quick else config.JobConfig().train.steps
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"train.run_dir={tmp}", f"train.steps={steps}", "checkpoint.enabled=false"]
        if args.quick:
            overrides += ["train.eval_every=6", "metrics.wandb_mode=disabled", "data.max_bytes=2000000",
                          "train.eval_batches=2"]
        cfg = config.load(benchlib.ROOT / "configs" / "default.toml", overrides)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "expertmesh.launch.cli", "run", "--nproc", str(NPROC),
                               "--config", "configs/default.toml", *overrides], cwd=benchlib.ROOT,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"training run failed:\n{proc.stderr[-4000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "default" / "metrics.jsonl").read_text().splitlines()]

    train = [r for r in records if r["kind"] == "train"][1:]  # the first window includes warm-up
    evals = [r for r in records if r["kind"] == "eval"]
    per_rank = statistics.median(r["tokens_per_s_per_rank"] for r in train)
    D, F = cfg.model.dim, cfg.moe.expert_dim
    tokens = cfg.data.batch_size * cfg.data.seq_len
    seconds = 0.5 if args.quick else 2.0
    ceiling = statistics.median(spawn(_matmul_rate, NPROC, args=(tokens, D, F, seconds)))
    ceiling_square = statistics.median(spawn(_matmul_rate, NPROC, args=(512, 512, 512, seconds)))
    flops_tok = train_flops_per_token(cfg)
    achieved = per_rank * flops_tok
    first, last = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    results = [
        {"case": "default model, 4 ranks x 1 thread", "impl": "expertmesh", "tokens_per_s_per_rank": per_rank,
         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
         "model_gflops_per_s_per_rank": achieved / 1e9, "fraction_of_matmul_ceiling": achieved / ceiling,
         "wall_clock_s": wall, "steps": steps,
         "first_eval_loss": first, "final_eval_loss": last,
         "comm_bytes_per_step": train[-1]["comm_bytes_per_step"]},
        {"case": f"fp32 matmul [{tokens}x{D}]@[{D}x{F}], 4 concurrent 1-thread ranks", "impl": "torch (ceiling)",
         "gflops_per_s_per_rank": ceiling / 1e9},
        {"case": "fp32 matmul 512^3, 4 concurrent 1-thread ranks", "impl": "torch (ceiling)",
         "gflops_per_s_per_rank": ceiling_square / 1e9},
    ]
    claims = [
        {"metric": "final eval loss reduction vs first eval", "value": 1 - last / first, "op": ">=", "target": 0.40},
        {"metric": "default run wall-clock minutes (make train)", "value": wall / 60, "op": "<=", "target": 10.0},
    ]
    more_rows, more_claims = compile_rows(args.quick, per_rank)
    results += more_rows
    claims += more_claims
    benchlib.write("train_throughput", {"config": "configs/default.toml", "nproc": NPROC, "threads_per_rank": 1,
                                        "train_flops_per_token": flops_tok, "quick": args.quick,
                                        "compile_steps": 6 if args.quick else COMPILE_STEPS,
                                        "overrides": overrides[1:]},
                   results, claims, out=args.out, threads=1)


if __name__ == "__main__":
    main()
