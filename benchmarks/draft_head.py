"""Draft heads trained inside the target's run against a standalone draft model, on the same data budget.

1. The target: `expertmesh run` of the default model (configs/default.toml, the model `make train` trains) for
   `target_steps`, one process.
2. The same data budget for both drafts, the target frozen (`optim.lr=1e-12`, no weight decay: the run goes on,
   its steps fall below fp32's resolution of its weights) so that both learn one fixed distribution:
   - head: the run resumed for `budget` more steps with `draft_head.enabled=true` (the in-loop path: features
     and logits of the step's own forward);
   - plain: the same resumed steps without a head (tokens/s: the head's cost, same steps, same data);
   - every: the head run again with `draft_head.every` = the metrics window (one head step per window: the
     head's cost, data and updates `every`-fold fewer);
   - draft: a standalone dense draft Transformer with at least as many parameters as the head outside its
     embedding and LM head, distilled (forward KL on the target's full distributions) on the same batches,
     with the head's optimizer settings.
3. Decoding on held-out prompts (the eval split, 64 tokens each, 64 new, one request at a time, greedy): tau
   (tokens per target forward) of the head (`head_generate`) and of the draft (`speculative_generate`) with
   chains of gamma = 4, of `long_gamma` (8) and of 21 (tau is capped at gamma + 1: at 4 both drafts near
   it); of the head trained every `every` steps (gamma = 4); of the head with a tree (children per depth 3,
   2, 1, 1: 21 drafted tokens), with dynamic trees of as many (21 levels, top-2, nodes valued by their counted
   acceptance, `Acceptance`; and EAGLE-2's: 12 levels, top-3, valued by the head's probabilities), with a dynamic
   tree of 1..as many nodes sized each round by cost (`CostTree`, the target's passes timed first at batch 1;
   counted acceptance) and with a chain of as many; wall-clock
   tokens/s of each and of plain decoding with a KV cache. The same arms but the dynamic trees (greedy only)
   again sampling at T = 1. The arms alternate per prompt, and every greedy arm's output must equal plain
   greedy decoding.

All of it twice: for the default model, and for a Qwen3-MoE of the same size (random weights written by transformers,
then trained by `expertmesh run` through `model.hf_path`: the fine-tune path; GQA, QK-norm, every layer MoE).

Targets (issue "Draft heads"): tau head / tau draft >= 1.3 (at each chain length); tau tree / tau chain of as many
tokens >= 1.2; the in-loop head <= 5% of the step time (timed inside the head's run: `draft_head.step_share`; and as the
tokens/s of the sequential runs), every step and every `every` steps.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch

from expertmesh import config as config_mod
from expertmesh.data.loader import TokenLoader, split_tokens
from expertmesh.distill.head import Acceptance, head_generate, load_head
from expertmesh.distill.head_online import HeadDraft
from expertmesh.distill.losses import divergence
from expertmesh.distill.models import load_lm
from expertmesh.distill.speculative import CostTree, measure_costs, speculative_generate
from expertmesh.models.transformer import Transformer, count_params
from expertmesh.train.wiring import load_data, warmup_cosine

FULL = dict(target_steps=600, budget=300, prompts=24, prompt_len=64, new=64, gamma=4, long_gamma=8, tree=[3, 2, 1, 1],
            log_every=25, dynamic=[21, 2], eagle2=[12, 3], every=25)
QUICK = dict(target_steps=20, budget=10, prompts=2, prompt_len=16, new=8, gamma=3, long_gamma=4, tree=[2, 1],
             log_every=5, dynamic=[3, 2], eagle2=[3, 2], every=5)
HEAD = ["draft_head.enabled=true", "draft_head.ttt_steps=3", "draft_head.lr=2e-3", "draft_head.warmup_steps=20"]


def cli(run_dir: Path, overrides: list[str]) -> None:
    argv = [sys.executable, "-m", "expertmesh.launch.cli", "run", "--nproc", "1", f'train.run_dir="{run_dir}"',
            'metrics.wandb_mode="disabled"', *overrides]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=benchlib.ROOT)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def records(run: Path, after: int) -> list[dict]:
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if r["kind"] == "train" and r["step"] > after]


def draft_model(cfg, head_params: int) -> tuple[Transformer, int]:
    """A dense draft of the target's width with the fewest layers whose own blocks hold at least the head's
    parameters (embedding and LM head not counted, as the head shares the target's)."""
    for n in range(1, 9):
        dcfg = config_mod.load(None, ["model.n_layers=" + str(n), f"moe.first_k_dense={n}",
                                      f"model.dim={cfg.model.dim}", f"model.n_heads={cfg.model.n_heads}",
                                      f"model.ffn_dim={cfg.model.ffn_dim}"])
        with torch.device("meta"):
            blocks = sum(p.numel() for p in Transformer(dcfg).layers.parameters())
        if blocks >= head_params:
            break
    torch.manual_seed(11)
    model = Transformer(dcfg)
    model.init_weights()
    return model, blocks


def distill_draft(draft, target, cfg, tokens, start_batch: int, steps: int, h) -> float:
    """Forward KL on the target's full distributions over the batches the head run read (its loader,
    fast-forwarded to the resume), with the head's optimizer and schedule."""
    train_tokens, _ = split_tokens(tokens, cfg.data.eval_fraction)
    loader = TokenLoader(train_tokens, cfg.data.seq_len, cfg.data.batch_size, 0, 1, cfg.train.seed, 1)
    loader.load_state_dict({"batches_served": start_batch})
    opt = torch.optim.AdamW(draft.parameters(), lr=h["lr"], betas=(cfg.optim.beta1, cfg.optim.beta2))
    sched = warmup_cosine(opt, h["warmup_steps"], steps, cfg.optim.min_lr_ratio)
    loss = float("nan")
    for _ in range(steps):
        x, _ = loader.next_batch()
        with torch.no_grad():
            p = target(x)[0].float().softmax(-1)
        logits, _ = draft(x)
        loss_t = divergence("fkl", logits.flatten(0, 1), p.flatten(0, 1))
        opt.zero_grad()
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = loss_t.item()
    return loss


@torch.no_grad()
def plain_decode(target, prompt, new: int) -> torch.Tensor:
    cache = target.make_cache()
    logits, _ = target(prompt, cache)
    out = []
    for _ in range(new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits, _ = target(nxt, cache)
    return torch.cat(out, 1)


def qwen3_moe_checkpoint(out: Path, quick: bool) -> Path:
    """A randomly initialised Qwen3-MoE of the default model's size (byte vocabulary), written by transformers."""
    import transformers as T

    torch.manual_seed(0)
    size = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=64) if quick else \
        dict(hidden_size=128, num_hidden_layers=4, intermediate_size=384, moe_intermediate_size=128)
    cfg = T.Qwen3MoeConfig(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                           tie_word_embeddings=False, **size)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    return out


def measure(root: Path, p: dict, quick: bool, label: str, extra: list[str]) -> tuple[list, list, float]:
    """The whole comparison for one target: trained by `expertmesh run` with `extra` overrides."""
    h = {"lr": 2e-3, "warmup_steps": 20}
    total = p["target_steps"] + p["budget"]
    common = [f"metrics.log_every={p['log_every']}", f"train.eval_every={total}", "train.eval_batches=2", *extra]
    if quick:
        common += ["data.max_bytes=400000", "data.seq_len=64"]
        if not extra:
            common += ["model.dim=64", "model.n_layers=2", "model.ffn_dim=128", "moe.expert_dim=64"]
    t0 = time.perf_counter()
    cli(root, [*common, "train.name=target", f"train.steps={p['target_steps']}",
               f"checkpoint.every={p['target_steps']}"])
    target_s = time.perf_counter() - t0
    frozen = [*common, f"train.steps={total}", "optim.lr=1e-12", "optim.weight_decay=0", f"checkpoint.every={total}"]
    for name in ("plain", "head", "every"):  # each resumes a copy of the target run
        subprocess.run(["cp", "-r", str(root / "target"), str(root / name)], check=True)
    cli(root, [*frozen, "train.name=plain"])
    cli(root, [*frozen, *HEAD, "train.name=head"])
    cli(root, [*frozen, *HEAD, f"draft_head.every={p['every']}", "train.name=every"])  # one head step per window
    warm = p["target_steps"] + p["log_every"]  # the first window of each resumed run holds its start
    runs_tok = ("plain", "head", "every")
    cli_tok = {n: statistics.median(r["tokens_per_s"] for r in records(root / n, warm)) for n in runs_tok}
    share, share_every = (statistics.median(r["draft_head"]["step_share"] for r in records(root / n, warm))
                          for n in ("head", "every"))
    head_rec = records(root / "head", p["target_steps"])[-1]["draft_head"]
    every_rec = records(root / "every", p["target_steps"])[-1]["draft_head"]

    cfg = config_mod.from_dict(json.loads((root / "target" / "config.json").read_text()))
    target, _, _ = load_lm(root / "head", torch.device("cpu"), "target")
    head, layers, _ = load_head(root / "head" / "draft_head")
    head.eval()
    head_every, _, _ = load_head(root / "every" / "draft_head")
    head_every.eval()
    head_params = sum(t.numel() for t in head.parameters())
    draft, draft_blocks = draft_model(cfg, head_params)
    _, tokens, _ = load_data(cfg, None, None)
    draft_loss = distill_draft(draft, target, cfg, tokens, p["target_steps"], p["budget"], h)
    draft.eval()
    _, eval_tokens = split_tokens(tokens, cfg.data.eval_fraction)
    stride = (len(eval_tokens) - p["prompt_len"]) // p["prompts"]
    prompts = [eval_tokens[i * stride:i * stride + p["prompt_len"]][None].long() for i in range(p["prompts"])]
    size = sum(math.prod(p["tree"][:d + 1]) for d in range(len(p["tree"])))
    costs = measure_costs(target, HeadDraft(head, layers, target, None), 1, p["prompt_len"], list(range(2, size + 2)),
                          cfg.model.vocab_size)
    by_cost = CostTree(costs, 1, size)  # one rule for all prompts, as a server keeps it
    counted, counted_cost = Acceptance(), Acceptance()  # the same: one count per arm for all prompts
    g2 = p["long_gamma"]
    runs = {"head": lambda x: head_generate(target, head, layers, x, p["new"], p["gamma"], greedy=True),
            "draft": lambda x: speculative_generate(target, draft, x, p["new"], p["gamma"], greedy=True),
            # longer chains: tau is capped at gamma + 1, which a good draft of either kind nears at gamma = 4
            "head g2": lambda x: head_generate(target, head, layers, x, p["new"], g2, greedy=True),
            "draft g2": lambda x: speculative_generate(target, draft, x, p["new"], g2, greedy=True),
            "draft long chain": lambda x: speculative_generate(target, draft, x, p["new"], size, greedy=True),
            "head every": lambda x: head_generate(target, head_every, layers, x, p["new"], p["gamma"], greedy=True),
            "head tree": lambda x: head_generate(target, head, layers, x, p["new"], tree=p["tree"], greedy=True),
            "head long chain": lambda x: head_generate(target, head, layers, x, p["new"], size, greedy=True),
            "head dynamic tree": lambda x: head_generate(target, head, layers, x, p["new"], greedy=True,
                                                         dynamic=(size, *p["dynamic"]), acceptance=counted),
            "head eagle2 tree": lambda x: head_generate(target, head, layers, x, p["new"], greedy=True,
                                                        dynamic=(size, *p["eagle2"])),
            "head tree by cost": lambda x: head_generate(target, head, layers, x, p["new"], greedy=True,
                                                         dynamic=(by_cost, *p["dynamic"]), acceptance=counted_cost),
            "plain": lambda x: (plain_decode(target, x, p["new"]), None),
            # sampling at T = 1: acceptance is lower than under greedy, where a tree's width can pay
            "head T=1": lambda x: head_generate(target, head, layers, x, p["new"], p["gamma"], generator=gen),
            "draft T=1": lambda x: speculative_generate(target, draft, x, p["new"], p["gamma"], generator=gen),
            "head g2 T=1": lambda x: head_generate(target, head, layers, x, p["new"], g2, generator=gen),
            "draft g2 T=1": lambda x: speculative_generate(target, draft, x, p["new"], g2, generator=gen),
            "draft long chain T=1": lambda x: speculative_generate(target, draft, x, p["new"], size, generator=gen),
            "head tree T=1": lambda x: head_generate(target, head, layers, x, p["new"], tree=p["tree"],
                                                     generator=gen),
            "head long chain T=1": lambda x: head_generate(target, head, layers, x, p["new"], size,
                                                           generator=gen)}
    gen = torch.Generator().manual_seed(0)
    emitted = {k: 0 for k in runs}
    drafted = {k: 0 for k in runs}
    forwards = {k: 0 for k in runs}
    seconds = {k: 0.0 for k in runs}
    for x in prompts:  # alternating the arms per prompt
        outs = {}
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out, stats = fn(x)
            seconds[name] += time.perf_counter() - t0
            outs[name] = out
            if stats is not None:
                emitted[name] += stats.emitted
                forwards[name] += stats.rounds
                drafted[name] += stats.drafted
        assert all(torch.equal(out, outs["plain"]) for name, out in outs.items() if "T=1" not in name)
    tau = {k: emitted[k] / forwards[k] for k in runs if k != "plain"}
    decode_tps = {k: p["prompts"] * p["new"] / seconds[k] for k in runs}
    results = [
        {"case": "decode greedy, chain", "impl": "draft head (in-loop)", "tau": tau["head"],
         "tokens_per_s": decode_tps["head"], "params": head_params, "head_loss": head_rec["loss"],
         "head_top1_by_step": head_rec["top1_by_step"]},
        {"case": "decode greedy, chain", "impl": "standalone draft", "tau": tau["draft"],
         "tokens_per_s": decode_tps["draft"], "params": count_params(draft)["total"], "params_blocks": draft_blocks,
         "draft_loss": draft_loss},
        {"case": "decode greedy, chain", "impl": f"draft head (in-loop, draft_head.every={p['every']})",
         "tau": tau["head every"], "tokens_per_s": decode_tps["head every"], "head_loss": every_rec["loss"],
         "head_top1_by_step": every_rec["top1_by_step"]},
        *[{"case": f"decode {mode}, chain of {n}", "impl": impl, "tau": tau[arm], "tokens_per_s": decode_tps[arm]}
          for mode, sfx in (("greedy", ""), ("T=1", " T=1"))
          for n, arm, impl in ((g2, "head g2" + sfx, "draft head (in-loop)"),
                               (g2, "draft g2" + sfx, "standalone draft"),
                               (size, "draft long chain" + sfx, "standalone draft"))],
        {"case": f"decode greedy, tree {p['tree']} ({size} drafted)", "impl": "draft head (in-loop)",
         "tau": tau["head tree"], "tokens_per_s": decode_tps["head tree"]},
        {"case": f"decode greedy, chain of {size}", "impl": "draft head (in-loop)", "tau": tau["head long chain"],
         "tokens_per_s": decode_tps["head long chain"]},
        {"case": f"decode greedy, dynamic tree of {size} (depth, top-k {p['dynamic']}), counted acceptance",
         "impl": "draft head (in-loop)", "tau": tau["head dynamic tree"],
         "tokens_per_s": decode_tps["head dynamic tree"], "acceptance_by_rank": Acceptance.by_rank([counted.table()])},
        {"case": f"decode greedy, dynamic tree of {size} (depth, top-k {p['eagle2']}), the head's probabilities "
                 "(EAGLE-2)", "impl": "draft head (in-loop)", "tau": tau["head eagle2 tree"],
         "tokens_per_s": decode_tps["head eagle2 tree"]},
        {"case": f"decode greedy, dynamic tree sized by cost (1..{size} nodes, depth, top-k {p['dynamic']}), "
                 "counted acceptance",
         "impl": "draft head (in-loop)", "tau": tau["head tree by cost"],
         "tokens_per_s": decode_tps["head tree by cost"],
         "mean_nodes": drafted["head tree by cost"] / forwards["head tree by cost"],
         "calibration": by_cost.calibration, "verify_s": costs["verify_s"], "draft_s": costs["draft_s"]},
        {"case": "decode greedy", "impl": "plain (KV cache)", "tau": 1.0, "tokens_per_s": decode_tps["plain"]},
        *[{"case": f"decode T=1, {what}", "impl": impl, "tau": tau[arm], "tokens_per_s": decode_tps[arm]}
          for arm, what, impl in (("head T=1", "chain", "draft head (in-loop)"),
                                  ("draft T=1", "chain", "standalone draft"),
                                  ("head tree T=1", f"tree {p['tree']} ({size} drafted)", "draft head (in-loop)"),
                                  ("head long chain T=1", f"chain of {size}", "draft head (in-loop)"))],
        {"case": "training, target frozen", "impl": "with head", "tokens_per_s": cli_tok["head"],
         "head_step_share": share},
        {"case": "training, target frozen", "impl": f"with head, draft_head.every={p['every']}",
         "tokens_per_s": cli_tok["every"], "head_step_share": share_every},
        {"case": "training, target frozen", "impl": "without head", "tokens_per_s": cli_tok["plain"]},
    ]
    claims = [
        {"metric": "tau, draft head (chain) / standalone draft (chain), same data budget",
         "value": tau["head"] / tau["draft"], "op": ">=", "target": 1.3},
        *[{"metric": f"tau{at}, draft head (chain of {n}) / standalone draft (chain of {n}), same data budget",
           "value": tau[f"head {arm}{sfx}"] / tau[f"draft {arm}{sfx}"], "op": ">=", "target": 1.3}
          for at, sfx in (("", ""), (" at T=1", " T=1")) for n, arm in ((g2, "g2"), (size, "long chain"))],
        {"metric": f"tau, draft head tree {p['tree']} / chain of as many ({size}) verified tokens",
         "value": tau["head tree"] / tau["head long chain"], "op": ">=", "target": 1.2},
        {"metric": f"tau, draft head dynamic tree of {size} (counted acceptance) / chain of as many verified tokens",
         "value": tau["head dynamic tree"] / tau["head long chain"], "op": ">=", "target": 1.2},
        {"metric": f"tau, draft head dynamic tree of {size} (the head's probabilities, EAGLE-2) / chain of as many "
                   "verified tokens", "value": tau["head eagle2 tree"] / tau["head long chain"], "op": ">=",
         "target": 1.2},
        {"metric": "tau at T=1, draft head (chain) / standalone draft (chain), same data budget",
         "value": tau["head T=1"] / tau["draft T=1"], "op": ">=", "target": 1.3},
        {"metric": f"tau at T=1, draft head tree {p['tree']} / chain of as many ({size}) verified tokens",
         "value": tau["head tree T=1"] / tau["head long chain T=1"], "op": ">=", "target": 1.2},
        {"metric": "in-loop head: its own time / the rest of the step, timed inside the same run",
         "value": share / (1 - share), "op": "<=", "target": 0.05},
        {"metric": "in-loop head: step time with / without - 1 (tokens/s, two sequential runs, same steps)",
         "value": cli_tok["plain"] / cli_tok["head"] - 1, "op": "<=", "target": 0.05},
        {"metric": f"in-loop head, draft_head.every={p['every']} (1/{p['every']} of the head's data): its own "
                   "time / the rest of the step, timed inside the same run",
         "value": share_every / (1 - share_every), "op": "<=", "target": 0.05},
        {"metric": f"in-loop head, draft_head.every={p['every']}: step time with / without - 1 (tokens/s, "
                   "sequential runs, same steps)", "value": cli_tok["plain"] / cli_tok["every"] - 1, "op": "<=",
         "target": 0.05},
        {"metric": "decoding tokens/s, dynamic tree sized by cost / the best fixed arm (reported)",
         "value": decode_tps["head tree by cost"] / max(v for k, v in decode_tps.items() if "T=1" not in k and
                                                        k != "head tree by cost"), "op": ">=", "target": 0.0},
        {"metric": "decoding tokens/s, draft head tree / plain (reported)",
         "value": decode_tps["head tree"] / decode_tps["plain"], "op": ">=", "target": 0.0},
    ]
    pre = "" if label == "default" else f"{label}: "
    for row in results:
        row["case"] = pre + row["case"]
    for claim in claims:
        claim["metric"] = pre + claim["metric"]
    return results, claims, target_s


def main() -> None:
    args = benchlib.parse_args(__doc__)
    p = QUICK if args.quick else FULL
    results, claims, seconds = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        qwen = qwen3_moe_checkpoint(root / "qwen3_hf", args.quick)
        targets = {"default": [], "qwen3_moe": [f'model.hf_path="{qwen}"']}
        for label, extra in targets.items():
            (root / label).mkdir()
            r, c, seconds[label] = measure(root / label, p, args.quick, label, extra)
            results += r
            claims += c
    benchlib.write("draft_head", {**p, "head": HEAD, "target_s": {k: round(v, 1) for k, v in seconds.items()},
                                  "model": "configs/default.toml" + (" (quick: smaller)" if args.quick else ""),
                                  "qwen3_moe": "a random Qwen3-MoE of the default model's size (transformers), "
                                               "trained by expertmesh run through model.hf_path"},
                   results, claims, args.out)


if __name__ == "__main__":
    main()
