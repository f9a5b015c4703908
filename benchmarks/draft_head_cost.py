"""What an in-loop draft head costs against the target's step, as the target deepens (one process, CPU).

The in-loop head (`draft_head.enabled`) runs, per micro-batch, its decoder layer(s) once per unrolled step of
its training-time test over every position of the step's batch, then the LM-head projection and the loss;
the target runs its n_layers blocks forward and backward. So the head's share should fall as 1 / n_layers.
Here the default model's widths (configs/default.toml: dim 128, 8 experts top-2 of 128, byte vocabulary,
batch 8 x 128) at n_layers = 4 (the default: what `draft_head.json` trains), 8, 16 and 32, each timed two
ways, alternating: the target's training step alone (forward, cross-entropy, backward, AdamW step), and the
same step followed by the head's (features and logits of that forward, detached, as `InLoopHead` keeps them;
`ttt_loss`, backward, AdamW step; `draft_head` defaults: 1 decoder layer, 3 unrolled steps). The head's
cost is the difference over the target's step, the issue's "<= 5% of the target's step time" measured as
the target deepens.
"""

from __future__ import annotations

import statistics

import benchlib
import torch
import torch.nn.functional as F

from expertmesh import config as config_mod
from expertmesh.config.checks import draft_head_layers
from expertmesh.distill.head import DraftHead, ttt_loss
from expertmesh.models.transformer import Transformer

FULL = dict(layers=[4, 8, 16, 32], reps=8, batch=8, seq=128)
QUICK = dict(layers=[2, 4], reps=2, batch=2, seq=32)


def steps(n_layers: int, batch: int, seq: int):
    """(the target's step, the target's step + the head's) for a fresh target of `n_layers` blocks."""
    cfg = config_mod.load(None, [f"model.n_layers={n_layers}", "draft_head.enabled=true"])
    torch.manual_seed(0)
    target = Transformer(cfg)
    target.init_weights()
    head = DraftHead(cfg.model, cfg.draft_head)
    opt_t = torch.optim.AdamW(target.parameters(), lr=1e-4)
    opt_h = torch.optim.AdamW(head.parameters(), lr=1e-4)
    layers = draft_head_layers(cfg)
    kept: dict = {}

    def keep(key):
        def hook(module, args, out):
            kept[key] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    target.tok_embeddings.register_forward_hook(keep("emb"))
    for i in sorted(set(layers)):
        target.layers[str(i)].register_forward_hook(keep(i))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=gen)

    def target_step():
        logits, _ = target(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
        return logits.detach()

    def with_head():
        logits = target_step()
        loss, _, _ = ttt_loss(head, [kept[i] for i in layers], kept["emb"], logits, target.output.weight.detach(),
                              cfg.draft_head)
        loss.backward()
        opt_h.step()
        opt_h.zero_grad(set_to_none=True)

    params = {"target": sum(p.numel() for p in target.layers.parameters()),
              "head": sum(p.numel() for p in head.parameters())}
    return target_step, with_head, params, cfg.draft_head.ttt_steps


def main() -> None:
    args = benchlib.parse_args(__doc__)
    p = QUICK if args.quick else FULL
    results, claims = [], []
    for n in p["layers"]:
        target_step, with_head, params, ttt = steps(n, p["batch"], p["seq"])
        t = benchlib.time_alternating({"target": target_step, "target + head": with_head}, p["reps"])
        base, both = statistics.median(t["target"]), statistics.median(t["target + head"])
        results.append({"case": f"training step, {n} target layers", "impl": "target", "median_s": base,
                        "times_s": t["target"], "params_blocks": params["target"]})
        results.append({"case": f"training step, {n} target layers", "impl": f"target + head ({ttt} unrolled "
                        "steps, 1 decoder layer)", "median_s": both, "times_s": t["target + head"],
                        "params": params["head"], "head_over_step": both / base - 1})
        claims.append({"metric": f"in-loop head: step time with / without - 1, {n} target layers (alternating, "
                                 "same process)", "value": both / base - 1, "op": "<=", "target": 0.05})
    benchlib.write("draft_head_cost", {**p, "model": "configs/default.toml widths, n_layers varied",
                                       "head": "draft_head defaults (1 decoder layer, ttt_steps 3)"},
                   results, claims, args.out)


if __name__ == "__main__":
    main()
