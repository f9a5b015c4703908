"""The rounding noise floor that the parity tests' tolerances stand on.

The layout, pipeline and DiLoCo tests compare a parallel run with one process. Their tolerances must sit
above what rounding alone produces, on any CPU. This script measures that: the same single-process
training run (the pipeline tests' reference: tiny model, every layer MoE, aux + z-loss, bias balancing,
clipping, 2 micro-batches per step, 5 steps) under every CPU kernel level this machine has
(`ATEN_CPU_CAPABILITY`, with MKL's and oneDNN's ISA lowered alike) and 1 or 2 threads: runs that differ
only in summation order. It reports the largest difference between any two of them in the per-step loss
and gradient norm (relative) and in the final weights (absolute), and sets them against the tests'
tolerances as claims (tolerance / floor, target >= 3).

    .venv/bin/python benchmarks/noise_floor.py [--quick]
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib
import torch

ROOT = benchlib.ROOT
sys.path.insert(0, str(ROOT / "tests"))
from combinations import PIPELINE_COMMON  # noqa: E402
from helpers import read_metrics, tiny_overrides  # noqa: E402

STEPS = 5
# ISA names per kernel level, for MKL and oneDNN (lowered with ATen's, so no library keeps the widest)
LEVELS = {"default": ("SSE4_2", "SSE41"), "avx2": ("AVX2", "AVX2"), "avx512": ("AVX512", "AVX512_CORE")}
# the tests' tolerances (tests/distributed/test_pipeline.py, test_parallel_layouts.py, ...)
TOLERANCES = {"loss_rel": 1e-5, "grad_norm_rel": 1e-4, "weights_abs": 1e-5}


def levels_here() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ["default"] + [lv for lv, flag in (("avx2", " avx2"), ("avx512", " avx512f")) if flag in flags]


def overrides(run_dir: Path, name: str, threads: int, steps: int) -> list[str]:
    return tiny_overrides(run_dir) + [
        f"train.steps={steps}", "metrics.log_every=1", "optim.grad_clip=0.5", f"train.threads={threads}",
        "train.eval_every=100", f"checkpoint.every={steps}", *PIPELINE_COMMON, "train.grad_accum=2",
        f"train.name={name}"]


def train_variant(run_dir: Path, name: str, level: str, threads: int, steps: int) -> None:
    mkl, dnnl = LEVELS[level]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level, MKL_ENABLE_INSTRUCTIONS=mkl, DNNL_MAX_CPU_ISA=dnnl,
               OMP_NUM_THREADS=str(threads))
    code = ("import sys; from expertmesh import config; from expertmesh.dist.env import DistEnv; "
            "from expertmesh.train.loop import run; "
            "run(config.load(None, sys.argv[1:]), DistEnv(0, 0, 1, 1, 'single'))")
    r = subprocess.run([sys.executable, "-c", code, *overrides(run_dir, name, threads, steps)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")


def weights(run_dir: Path, name: str, steps: int) -> dict[str, torch.Tensor]:
    from expertmesh import config
    from expertmesh.dist.checkpoint import load_model
    from expertmesh.models.transformer import Transformer

    model = Transformer(config.load(None, overrides(run_dir, name, 1, steps)))
    load_model(run_dir / name / f"step-{steps}", model)
    return model.state_dict()


def spread(a: dict, b: dict, wa: dict, wb: dict) -> dict:
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-30)  # noqa: E731
    return {"loss_rel": max(rel(a[s]["loss_avg"], b[s]["loss_avg"]) for s in a),
            "grad_norm_rel": max(rel(a[s]["grad_norm"], b[s]["grad_norm"]) for s in a),
            "weights_abs": max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa),
            "expert_load_equal": all(a[s]["expert_load"] == b[s]["expert_load"] for s in a)}


def main() -> None:
    args = benchlib.parse_args(__doc__)
    steps = 2 if args.quick else STEPS
    variants = [(lv, t) for lv in levels_here() for t in (1, 2)]
    if args.quick:
        variants = [("default", 1), (levels_here()[-1], 1)]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        runs = {}
        for level, threads in variants:
            name = f"{level}-t{threads}"
            train_variant(run_dir, name, level, threads, steps)
            runs[name] = (read_metrics(run_dir / name), weights(run_dir, name, steps))
        results = []
        for x, y in itertools.combinations(runs, 2):
            results.append({"case": f"{x} vs {y}", "impl": "single process, summation order only",
                            **spread(runs[x][0], runs[y][0], runs[x][1], runs[y][1])})
    floor = {key: max(row[key] for row in results) for key in TOLERANCES}
    claims = [{"metric": f"test tolerance / noise floor, {key} (tolerance {tol:g}, floor {floor[key]:.3g})",
               "value": float(tol / floor[key]) if floor[key] else float("inf"), "op": ">=", "target": 3.0}
              for key, tol in TOLERANCES.items()]
    benchlib.write("noise_floor", {"steps": steps, "variants": [f"{lv}-t{t}" for lv, t in variants],
                                   "levels_here": levels_here(), "reference": "tests/distributed/test_pipeline.py"},
                   results, claims, args.out, extra={"floor": floor, "tolerances": TOLERANCES})
    print(json.dumps(floor))


if __name__ == "__main__":
    main()
