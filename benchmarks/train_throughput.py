"""Training throughput of the default model, tokens/s per rank, as `make train` runs it.

Runs the default config through `expertmesh run --nproc 4` (torchrun, 4 gloo ranks, 1 thread each),
and in the same session measures the anchor: the fp32 matmul FLOP rate each of 4 concurrent
1-thread processes gets on this machine (the compute ceiling under the same contention). Reports
model FLOPs utilisation against it, the wall-clock of the run, and the drop in held-out loss.
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
    benchlib.write("train_throughput", {"config": "configs/default.toml", "nproc": NPROC, "threads_per_rank": 1,
                                        "train_flops_per_token": flops_tok, "quick": args.quick,
                                        "overrides": overrides[1:]},
                   results, claims, out=args.out, threads=1)


if __name__ == "__main__":
    main()
