"""Expert-sparse Streaming DiLoCo exchanges under skewed routing: bytes per sync against the share of
expert rows some worker trained.

2 workers x 1 gloo rank, a model whose weights are mostly experts (32 experts of every layer, top-2), 4-bit
exchanges every H = 4 steps (one fragment). Routing is skewed as in the FSSDP benchmark, through the
router's selection bias (`expert_bias`, which the top-k selection adds to the scores and nothing updates
here): expert e of every layer gets -s * 0.01 * ln(1 + e), a Zipf-like order whose strength grows with s
(the softmax scores of 32 experts are ~0.03, so s = 1 already starves the last experts). For each skew, one
run with `diloco.expert_sparse = false` and one with `true`, the same data and seeds; per run, the mean
over its syncs of the bytes rank 0 sent (`diloco.bytes_last_sync`) and of the expert rows that crossed
(`expert_rows_sent / expert_rows`), and the final held-out loss.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import benchlib

WORKERS, E, H = 2, 32, 4
SKEWS = [0.0, 0.5, 1.0, 2.0, 4.0]


def _train(rank, world, overrides, skew):
    import math

    import torch

    from expertmesh import config
    from expertmesh.dist.env import DistEnv
    from expertmesh.models import init
    from expertmesh.train.loop import run

    plain = init.init_tensor

    def skewed(cfg, name, t, *rest, **kw):  # the model's initialization, then the skew's selection bias
        plain(cfg, name, t, *rest, **kw)
        if name.endswith("expert_bias"):
            t.copy_(torch.tensor([-skew * 0.01 * math.log(1 + e) for e in range(t.numel())]))

    init.init_tensor = skewed
    run(config.load(None, overrides), DistEnv(rank, rank, world, world, "torchrun"))
    return rank


def summarize(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    syncs = [r["diloco"] for r in records if r["kind"] == "train" and r["step"] % H == 0]
    evals = [r for r in records if r["kind"] == "eval"]
    out = {"syncs": len(syncs), "bytes_per_sync": sum(s["bytes_last_sync"] for s in syncs) / len(syncs),
           "final_eval_loss": evals[-1]["eval_loss"]}
    if "expert_rows" in syncs[0]:
        out["expert_rows_share"] = sum(s["expert_rows_sent"] / s["expert_rows"] for s in syncs) / len(syncs)
    return out


def main() -> None:
    args = benchlib.parse_args(__doc__)
    from expertmesh.testing import spawn

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    steps, skews = (4, [4.0]) if args.quick else (24, SKEWS)
    model = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128", "moe.every=1",
             f"moe.num_experts={E}", "moe.top_k=2", "moe.expert_dim=32", "data.seq_len=64", "data.batch_size=2",
             "data.max_bytes=400000"]
    tmp = Path(tempfile.mkdtemp(prefix="diloco-experts-"))
    common = model + [f'train.run_dir="{tmp}"', f"train.steps={steps}", "metrics.log_every=1",
                      f"train.eval_every={steps}", 'metrics.wandb_mode="disabled"', "train.threads=1",
                      "checkpoint.enabled=false", "diloco.enabled=true", f"parallel.dp_replicate={WORKERS}",
                      f"diloco.sync_every={H}", "diloco.fragments=1", "diloco.quant_bits=4"]
    rows, claims = [], []
    try:
        for s in skews:
            got = {}
            for sparse in (False, True):
                name = f"s{s}-{'sparse' if sparse else 'dense'}"
                spawn(_train, WORKERS, args=(common + [f"train.name={name}",
                                                      f"diloco.expert_sparse={str(sparse).lower()}"], s),
                      timeout=1200)
                got[sparse] = summarize(tmp / name)
                print(name, got[sparse], flush=True)
            share = got[True]["expert_rows_share"]
            ratio = got[True]["bytes_per_sync"] / got[False]["bytes_per_sync"]
            rows.append({"case": f"zipf-like selection bias s={s}", "impl": "4-bit, expert_sparse=false",
                         **got[False]})
            rows.append({"case": f"zipf-like selection bias s={s}", "impl": "4-bit, expert_sparse=true",
                         **got[True], "bytes_vs_dense": ratio})
            claims.append({"metric": f"bytes per sync, expert-sparse / dense, s={s} (expert rows trained by some "
                                     f"worker: {share:.3f})", "value": ratio, "op": "<=", "target": 1.0})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    benchlib.write("diloco_expert_sparse", {"workers": WORKERS, "experts": E, "top_k": 2, "H": H, "steps": steps,
                                            "skews": skews, "model_overrides": model, "quick": args.quick},
                   rows, claims, out=args.out, threads=1)


if __name__ == "__main__":
    main()
