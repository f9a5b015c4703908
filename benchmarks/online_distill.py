"""Online draft distillation under a domain shift, through `expertmesh distill` (one process per arm).

Models (byte level, trained here, cached in --models): a target (~3M parameters) trained on two
domains, A = the standard library's .py sources and B = the C headers under /usr/include (the first
90% of each: the prompts come from the last 10%); a draft (~12x smaller) distilled offline from the
target (forward KL on its full distributions) on A only; and an oracle draft: the A draft distilled
further on B.

Stream: 400 requests from A, then 400 from B, then a 50-request A probe (forgetting); gamma = 4,
64 new tokens, prompts of 64 tokens, one request at a time, at T = 1 and greedy. Arms: the static
A draft; online with the draft's rejected positions only (OSD, FKL); online on every verified
position (FKL); online on the draft's own samples (DistillSpec's on-policy data) with JSD and TVD;
the static oracle. Each arm reads back its responses (per request: expected acceptance alpha =
mean sum min(p, q) over drafted positions, target forwards, tokens).

Reported per arm and mode: alpha on A (the 100 requests before the shift), alpha on B (moving
average over 50 requests, at every 50), alpha on B at 200 B requests, tokens per target forward on
B, requests until alpha on B is within 0.05 of the oracle's, alpha on the A probe (forgetting).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import benchlib
import torch
import torch.nn.functional as F

from expertmesh import config as config_mod
from expertmesh.data.corpus import domain_text
from expertmesh.data.tokenizer import ByteTokenizer
from expertmesh.distill.models import export_run
from expertmesh.distill.stream import DOMAIN_BYTES, HELD_OUT
from expertmesh.models.transformer import Transformer, count_params

FULL = dict(target=dict(dim=256, n_layers=4, n_heads=4, ffn_dim=640), draft=dict(dim=96, n_layers=2, n_heads=2,
            ffn_dim=256), target_steps=700, draft_steps=300, oracle_steps=300, seq=128, batch=16, n_a=400, n_b=400,
            n_probe=50, new=64, prompt=64, gamma=4, window=50, update_every=8, update_steps=8, update_batch=32,
            lr=3e-3)
QUICK = dict(target=dict(dim=64, n_layers=2, n_heads=2, ffn_dim=128), draft=dict(dim=32, n_layers=1, n_heads=2,
             ffn_dim=64), target_steps=30, draft_steps=20, oracle_steps=20, seq=64, batch=8, n_a=8, n_b=8, n_probe=4,
             new=16, prompt=16, gamma=4, window=4, update_every=2, update_steps=2, update_batch=16, lr=1e-3)
ARMS = {  # name -> overrides (the draft is the A draft unless the arm names the oracle)
    "static": ["distill.online=false"],
    "online rejected fkl": ['distill.positions="rejected"', 'distill.divergence="fkl"'],
    "online all fkl": ['distill.positions="all"', 'distill.divergence="fkl"'],
    "online onpolicy jsd": ['distill.positions="onpolicy"', 'distill.divergence="jsd"'],
    "online onpolicy tvd": ['distill.positions="onpolicy"', 'distill.divergence="tvd"'],
    "oracle (offline on B)": ["distill.online=false"],
}
GREEDY_ARMS = ["static", "online rejected fkl", "online all fkl", "oracle (offline on B)"]
QUICK_ARMS = ["static", "online rejected fkl", "oracle (offline on B)"]


def model_cfg(shape: dict, seq: int):
    return config_mod.load(None, [f"model.{k}={v}" for k, v in shape.items()] + [
        "moe.every=1000", "model.max_seq_len=256", f"data.seq_len={seq}"])


def domain_tokens(name: str) -> torch.Tensor:
    text = domain_text(name, DOMAIN_BYTES)
    return ByteTokenizer().encode(text[: int(len(text) * (1 - HELD_OUT))])  # the stream's prompts: the rest


def batches(tokens: list[torch.Tensor], seq: int, batch: int, gen: torch.Generator):
    """Windows of seq + 1 tokens, the batch split evenly over the given domains."""
    rows = []
    for i in range(batch):
        t = tokens[i % len(tokens)]
        start = int(torch.randint(0, len(t) - seq - 1, (1,), generator=gen))
        rows.append(t[start:start + seq + 1])
    x = torch.stack(rows)
    return x[:, :-1], x[:, 1:]


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(steps // 20, 1)
    return lr * min((step + 1) / warm, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def train_lm(model, tokens, steps, seq, batch, lr, seed, teacher=None) -> float:
    """Cross-entropy on the text, or (with a teacher) forward KL to the teacher's distributions."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x, y = batches(tokens, seq, batch, gen)
        logits, _ = model(x)
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                p_log = teacher(x)[0].log_softmax(-1)
            loss = F.kl_div(logits.log_softmax(-1).flatten(0, 1), p_log.flatten(0, 1), log_target=True,
                            reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step}/{steps} loss {float(loss):.4f}", flush=True)
    model.eval()
    return float(loss)


@torch.no_grad()
def held_out_loss(model, tokens, seq, seed=7, n=8) -> float:
    x, y = batches([tokens], seq, n, torch.Generator().manual_seed(seed))
    return float(F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()))


def build_models(p: dict, root: Path) -> dict:
    """Trains (or reuses) target, A draft and oracle draft; returns their run dirs and training facts."""
    key = json.dumps({k: p[k] for k in ("target", "draft", "target_steps", "draft_steps", "oracle_steps", "seq",
                                        "batch")}, sort_keys=True)
    info_path = root / "models.json"
    if info_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        return json.loads(info_path.read_text())
    shutil.rmtree(root, ignore_errors=True)
    torch.set_num_threads(2)
    a, b = domain_tokens("stdlib"), domain_tokens("headers")
    a_eval, b_eval = ByteTokenizer().encode(domain_text("stdlib", DOMAIN_BYTES)[-200_000:]), \
        ByteTokenizer().encode(domain_text("headers", DOMAIN_BYTES)[-200_000:])
    info = {"key": key, "train_seconds": {}}
    tcfg, dcfg = model_cfg(p["target"], p["seq"]), model_cfg(p["draft"], p["seq"])
    torch.manual_seed(0)
    target = Transformer(tcfg)
    target.init_weights()
    t0 = time.time()
    print("target on A + B", flush=True)
    train_lm(target, [a, b], p["target_steps"], p["seq"], p["batch"], 2e-3, 1)
    info["train_seconds"]["target"] = time.time() - t0
    torch.manual_seed(1)
    draft = Transformer(dcfg)
    draft.init_weights()
    t0 = time.time()
    print("draft distilled on A", flush=True)
    train_lm(draft, [a], p["draft_steps"], p["seq"], p["batch"], 3e-3, 2, teacher=target)
    info["train_seconds"]["draft_A"] = time.time() - t0
    info["params"] = {"target": count_params(target)["total"], "draft": count_params(draft)["total"]}
    info["held_out_loss"] = {"target": {"A": held_out_loss(target, a_eval, p["seq"]),
                                        "B": held_out_loss(target, b_eval, p["seq"])},
                             "draft_A": {"A": held_out_loss(draft, a_eval, p["seq"]),
                                         "B": held_out_loss(draft, b_eval, p["seq"])}}
    info["target"] = str(export_run(tcfg, target, root / "target"))
    info["draft_A"] = str(export_run(dcfg, draft, root / "draft_A"))
    t0 = time.time()
    print("oracle: the A draft distilled further on B", flush=True)
    train_lm(draft, [b], p["oracle_steps"], p["seq"], p["batch"], 3e-3, 3, teacher=target)
    info["train_seconds"]["oracle_B"] = time.time() - t0
    info["held_out_loss"]["oracle_B"] = {"A": held_out_loss(draft, a_eval, p["seq"]),
                                         "B": held_out_loss(draft, b_eval, p["seq"])}
    info["oracle_B"] = str(export_run(dcfg, draft, root / "oracle_B"))
    info_path.write_text(json.dumps(info, indent=1))
    return info


def run_arm(job) -> tuple[str, str, list[dict], float]:
    """One arm through the real `expertmesh distill` path, in its own process with one thread."""
    arm, greedy, p, models, run_dir = job
    from expertmesh.dist.env import DistEnv
    from expertmesh.launch import distill

    draft = models["oracle_B"] if arm.startswith("oracle") else models["draft_A"]
    name = arm.replace(" ", "_").replace("(", "").replace(")", "") + ("_greedy" if greedy else "_T1")
    cfg = config_mod.load(None, ARMS[arm] + [
        f'distill.target="{models["target"]}"', f'distill.draft="{draft}"', f'train.run_dir="{run_dir}"',
        f'train.name="{name}"', "train.threads=1", 'metrics.wandb_mode="disabled"',
        f'distill.synthetic=["stdlib:{p["n_a"]}", "headers:{p["n_b"]}", "stdlib:{p["n_probe"]}"]',
        f"distill.gamma={p['gamma']}", f"distill.max_new_tokens={p['new']}", f"distill.prompt_len={p['prompt']}",
        f"distill.greedy={str(greedy).lower()}", f"distill.window={p['window']}",
        f"distill.update_every={p['update_every']}", f"distill.update_steps={p['update_steps']}",
        f"distill.update_batch={p['update_batch']}", f"distill.lr={p['lr']}", "distill.save_draft=false"])
    t0 = time.time()
    distill.run(cfg, DistEnv(0, 0, 1, 1, "single"))
    seconds = time.time() - t0
    responses = [json.loads(line) for line in (cfg.run_path / "responses-rank0.jsonl").read_text().splitlines()]
    return arm, "greedy" if greedy else "T=1", sorted(responses, key=lambda r: r["index"]), seconds


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def analyse(responses: list[dict], p: dict, oracle_alpha_b: float | None) -> dict:
    A = responses[:p["n_a"]]
    B = responses[p["n_a"]:p["n_a"] + p["n_b"]]
    probe = responses[p["n_a"] + p["n_b"]:]
    w = p["window"]
    steady_a = A[-max(len(A) // 4, 1):]
    curve = [mean(r["alpha"] for r in B[max(0, n - w):n]) for n in range(w, len(B) + 1, w)]
    at = min(len(B), 200 if p["n_b"] >= 200 else len(B))
    out = {
        "alpha_A": mean(r["alpha"] for r in steady_a),
        "alpha_B": mean(r["alpha"] for r in B),
        "alpha_B_first_window": mean(r["alpha"] for r in B[:w]),
        "alpha_B_at_200": mean(r["alpha"] for r in B[max(0, at - w):at]),
        "alpha_B_last_window": mean(r["alpha"] for r in B[-w:]),
        "alpha_B_moving_avg": curve,
        "alpha_A_probe": mean(r["alpha"] for r in probe),
        "tokens_per_target_forward_A": sum(len(r["tokens"]) for r in A) / sum(r["rounds"] for r in A),
        "tokens_per_target_forward_B": sum(len(r["tokens"]) for r in B) / sum(r["rounds"] for r in B),
        "tokens_per_target_forward_B_last_half": sum(len(r["tokens"]) for r in B[len(B) // 2:])
        / sum(r["rounds"] for r in B[len(B) // 2:]),
    }
    out["alpha_lost_on_A"] = out["alpha_A"] - out["alpha_A_probe"]
    if oracle_alpha_b is not None:
        hits = [n for n in range(w, len(B) + 1) if mean(r["alpha"] for r in B[n - w:n]) >= oracle_alpha_b - 0.05]
        out["requests_to_within_0.05_of_oracle"] = hits[0] if hits else None
    return out


def main() -> None:
    args = benchlib.parse_args(__doc__.splitlines()[0])
    p = QUICK if args.quick else FULL
    models_root = Path("/tmp/expertmesh-bench/online_distill" + ("-quick" if args.quick else ""))
    t_start = time.time()
    models = build_models(p, models_root / "models")
    run_dir = models_root / "runs"
    shutil.rmtree(run_dir, ignore_errors=True)
    jobs = [(arm, False, p, models, str(run_dir)) for arm in (QUICK_ARMS if args.quick else ARMS)]
    jobs += [(arm, True, p, models, str(run_dir)) for arm in (QUICK_ARMS if args.quick else GREEDY_ARMS)]
    with mp.get_context("spawn").Pool(2) as pool:  # two arms at a time, one thread each (2 cores)
        done = pool.map(run_arm, jobs, chunksize=1)
    results, by = [], {}
    for mode in ("T=1", "greedy"):
        runs = {arm: (resp, sec) for arm, m, resp, sec in done if m == mode}
        oracle = analyse(runs["oracle (offline on B)"][0], p, None)["alpha_B"]
        for arm, (resp, sec) in runs.items():
            row = {"case": mode, "impl": arm, **analyse(resp, p, oracle), "serve_seconds": sec}
            results.append(row)
            by[(mode, arm)] = row
    claims = []
    for mode in ("T=1", "greedy"):
        static = by[(mode, "static")]
        claims.append({"metric": f"static draft alpha drop A -> B ({mode})",
                       "value": static["alpha_A"] - static["alpha_B"], "op": ">=", "target": 0.0})
        for arm in [a for a in ARMS if a.startswith("online") and (mode, a) in by]:
            row = by[(mode, arm)]
            claims.append({"metric": f"alpha recovery on B within 200 B requests vs static, {arm} ({mode})",
                           "value": row["alpha_B_at_200"] - static["alpha_B_at_200"], "op": ">=", "target": 0.15})
            claims.append({"metric": f"tokens per target forward on B, {arm} / static ({mode})",
                           "value": row["tokens_per_target_forward_B"] / static["tokens_per_target_forward_B"],
                           "op": ">=", "target": 1.3})
    cfg = {k: v for k, v in p.items()}
    cfg.update(params=models["params"], held_out_loss=models["held_out_loss"], train_seconds=models["train_seconds"],
               domains={"A": "stdlib .py (first 90% trains, last 10% prompts)",
                        "B": "/usr/include .h (first 90% trains, last 10% prompts)"},
               batch_size=1, total_seconds=time.time() - t_start)
    benchlib.write("online_distill", cfg, results, claims, args.out, threads=1)


if __name__ == "__main__":
    main()
