"""Link failures between two sites: elastic Streaming DiLoCo workers through a cut link and a trickle.

Two sites (benchmarks/wanlab.py), an elastic worker per site (1 rank each; the store at site a), the
default model, 4-bit Streaming DiLoCo (H=4, 2 fragments, overlap 1), `--steps` steps. Three runs on the
same data and seeds, each holding both workers at the same two steps so that what happens between them
does not depend on the machine's speed:
  uninterrupted  nothing happens at the holds
  cut            after step steps/5 the link is cut (both ends down); it comes back once worker 0 has
                 re-formed alone and worker 1 has found the store out of reach (diloco.timeout_s=4), and
                 worker 0 waits after step 3*steps/5 until worker 1 has asked to rejoin
  trickle        after step steps/5 the link is shaped to 1 Mbit/s, until both workers reach step 2*steps/5
                 (diloco.timeout_s=60: a slow exchange is not a failure)
Per run: exit codes, whether the workers end with the same global state (the final held-out loss of each
worker, which evaluates the global copy), the held-out loss against the uninterrupted run's, the workers'
`left` / `joined` counts, and the longest exchange (`diloco.seconds_last_sync`) before, during and after.

    sudo .venv/bin/python benchmarks/wan_failures.py [--steps 60]

Needs root and iproute2; refuses in one line otherwise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import benchlib
from wanlab import ELASTIC, Lab, LabUnavailable, available, reached


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_run(tmp: Path, kind: str, steps: int, at: int, until: int, rejoin: int, model: list[str]) -> dict:
    run = tmp / kind
    overrides = [f'train.run_dir="{tmp}"', f"train.name={kind}", f"train.steps={steps}", "metrics.log_every=1",
                 "checkpoint.enabled=false", 'metrics.wandb_mode="disabled"', "train.eval_batches=4", *model,
                 *ELASTIC, *(["diloco.timeout_s=60"] if kind == "trickle" else [])]
    work = tmp / kind / "lab"  # the workers' logs
    work.mkdir(parents=True)

    def both_at(step):
        return lambda: all(reached(run / f"worker{w}", step) for w in (0, 1))

    with Lab() as lab:
        if kind == "cut":
            events = lab.cut_events(run, work, at, until, rejoin)
        else:
            shape = (lambda: lab.shape(1), lambda: lab.shape(None)) if kind == "trickle" else (None, None)
            events = [(step, both_at(step), act or (lambda: None), (0, 1))
                      for step, act in zip((at, until), shape, strict=True)]
        codes, _ = lab.elastic_pair(work, overrides, events, timeout=1800)
    out = {"exit_codes": codes}
    finals = []
    for w in (0, 1):
        recs = _records(run / f"worker{w}")
        train = [r for r in recs if r["kind"] == "train"]
        evals = [r for r in recs if r["kind"] == "eval"]
        finals.append(evals[-1]["eval_loss"])
        phases = {"before": [r for r in train if r["step"] <= at],
                  "between": [r for r in train if at < r["step"] <= until],
                  "after": [r for r in train if r["step"] > until]}
        out[f"worker{w}"] = {
            "final_eval_loss": evals[-1]["eval_loss"], "left": train[-1]["diloco"]["left"],
            "joined": train[-1]["diloco"]["joined"], "steps_logged": len({r["step"] for r in train}),
            **{f"longest_sync_s_{k}": max((r["diloco"]["seconds_last_sync"] for r in v), default=0.0)
               for k, v in phases.items()}}
    out["same_global_model"] = finals[0] == finals[1]
    out["final_eval_loss"] = finals[0]
    return out


def main() -> None:
    def options(p):
        p.add_argument("--steps", type=int, default=60, help="inner steps of every run")

    args = benchlib.parse_args(__doc__, options)
    why = available()
    if why:
        raise SystemExit(why)
    if args.quick:
        steps, at, until, rejoin = 32, 8, 16, 24
        model = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "moe.num_experts=4",
                 "moe.expert_dim=32", "data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000"]
    else:
        steps, at, until, rejoin = args.steps, args.steps // 5, args.steps * 2 // 5, args.steps * 3 // 5
        model = ["data.max_bytes=400000"]
    tmp = Path(tempfile.mkdtemp(prefix="wan-failures-"))
    results = {}
    try:
        for kind in ("uninterrupted", "cut", "trickle"):
            results[kind] = one_run(tmp, kind, steps, at, until, rejoin, model)
            print(kind, json.dumps(results[kind]), flush=True)
    except LabUnavailable as err:
        raise SystemExit(str(err)) from None
    base = results["uninterrupted"]["final_eval_loss"]
    rows, claims = [], []
    for kind, r in results.items():
        rows.append({"case": f"2 sites x 1 rank, {steps} steps, event after step {at}, over after step {until}",
                     "impl": kind, **r, "loss_vs_uninterrupted": r["final_eval_loss"] / base - 1})
    for kind in ("cut", "trickle"):
        r = results[kind]
        claims.append({"metric": f"{kind}: held-out loss relative to the uninterrupted run (fraction above)",
                       "value": r["final_eval_loss"] / base - 1, "op": "<=", "target": 0.01})
        claims.append({"metric": f"{kind}: both workers exited 0 with the same global model (1 = yes)",
                       "value": float(r["exit_codes"] == [0, 0] and r["same_global_model"]), "op": ">=",
                       "target": 1.0})
    benchlib.write("wan_failures", {"steps": steps, "at": at, "until": until, "model_overrides": model,
                                    "elastic": ELASTIC, "quick": args.quick}, rows, claims, out=args.out, threads=1)


if __name__ == "__main__":
    main()
