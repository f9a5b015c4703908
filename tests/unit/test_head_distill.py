"""A draft head as `expertmesh distill`'s draft: what decoding records of the target equals a plain forward of the
final sequences, the online loss over it equals the in-loop loss, and one process serves, distills, saves and
resumes a head."""

import json

import pytest
import torch
from helpers import make_run
from test_distill_launch import SINGLE, distill_cfg, records

from expertmesh.config import ConfigError, DraftHeadConfig, JobConfig, ModelConfig, MoEConfig
from expertmesh.config.checks import draft_head_layers
from expertmesh.distill.head import DraftHead, HeadTrace, head_generate, load_head, ttt_loss
from expertmesh.distill.head_online import FeatureExample, HeadDistiller, HeadDraft
from expertmesh.distill.models import load_lm
from expertmesh.distill.online import weights_digest
from expertmesh.launch import distill
from expertmesh.models.transformer import Transformer


def _float64_target(vocab=64, seed=0, ttt_steps=2):
    cfg = JobConfig(model=ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=vocab,
                                      max_seq_len=64), moe=MoEConfig(num_experts=4, expert_dim=32, every=2),
                    draft_head=DraftHeadConfig(ttt_steps=ttt_steps))
    torch.manual_seed(seed)
    target = Transformer(cfg)
    target.init_weights()
    head = DraftHead(cfg.model, cfg.draft_head)
    return cfg, target.double().eval(), head.double(), draft_head_layers(cfg)


def _plain(target, layers, tokens):
    """The target's logits and its three blocks' outputs side by side, from one plain forward."""
    kept = {}

    def keep(i):
        return lambda module, args, out: kept.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    hooks = [target.layers[str(i)].register_forward_hook(keep(i)) for i in sorted(set(layers))]
    try:
        with torch.no_grad():
            logits, _ = target(tokens)
    finally:
        for h in hooks:
            h.remove()
    return logits, torch.cat([kept[i] for i in layers], -1)


@pytest.mark.parametrize("tree", [None, [3, 2, 1]], ids=["chain", "tree"])
def test_the_trace_of_decoding_is_a_plain_forward_of_the_final_sequences(tree):
    """Every position of the final sequences (prompt and answer, three requests in lockstep): the features and
    top-k distribution recorded from the prefill and the tree/chain verification passes equal those of one plain
    forward of the final sequence (float64)."""
    _, target, head, layers = _float64_target()
    prompt = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(2))
    trace = HeadTrace(topk=5)
    rounds = []
    with torch.no_grad():
        out, stats = head_generate(target, head, layers, prompt, 10, gamma=3, tree=tree, greedy=True, trace=trace,
                                   on_round=lambda *a: rounds.append(a))
    assert len(rounds) == stats.rounds and all(len(acc) == 3 and len(al) == 3 for _, _, acc, al in rounds)
    assert all(0 <= a <= 1 for *_, al in rounds for a in al)
    rows = trace.rows()
    assert torch.equal(torch.stack([r[0] for r in rows])[:, 6:16], out)
    for tokens, feats, idx, p in rows:
        logits, want = _plain(target, layers, tokens[None, :-1])
        top_p, top_i = logits[0].softmax(-1).topk(5, -1)
        # the trace stores fp32 (one rounding, 6e-8 relative) of float64 values that differ from the plain forward's
        # only in summation order (~1e-15): 1e-6 allows the rounding and nothing a wrong position would give
        torch.testing.assert_close(feats, want[0].float(), rtol=1e-6, atol=1e-6)
        assert torch.equal(idx, top_i)
        torch.testing.assert_close(p, top_p.float(), rtol=1e-6, atol=1e-7)


def test_the_online_loss_over_recorded_examples_is_the_in_loop_loss():
    """`HeadDistiller.loss` over examples holding the target's whole distribution equals `ttt_loss` over the
    target's forward of the same sequences (the loss `draft_head.enabled` trains), with the unrolled steps; and a
    right-padded batch of a long and a short sequence weighs each position once (step 0 alone: the mean over
    both sequences' positions)."""
    for steps in (2, 1):
        cfg, target, head, layers = _float64_target(ttt_steps=steps)
        draft = HeadDraft(head, layers, target, cfg.draft_head)
        distiller = HeadDistiller(draft, 64, kind="fkl")
        lengths = (12, 12) if steps == 2 else (12, 7)
        seqs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
        examples, single = [], []
        for s in seqs:
            logits, feats = _plain(target, layers, s[None, :-1])
            p = logits[0].softmax(-1)
            examples.append(FeatureExample(s, feats[0].float(), torch.arange(64).expand(len(s) - 1, -1), p.float()))
            with torch.no_grad():
                loss, _, _ = ttt_loss(head, list(feats.chunk(3, -1)), target.tok_embeddings(s[None, :-1]), logits,
                                      target.output.weight, cfg.draft_head)
            single.append(float(loss))
        with torch.no_grad():
            got = float(distiller.loss(examples))
        # 1e-5: the online loss reads fp32-stored features and probabilities, the in-loop one float64 features and
        # an fp32 softmax (fp32 rounding, ~1e-7 relative, through a sum of a few hundred terms)
        if steps == 2:  # two sequences of one length: the in-loop loss of the batch of both
            logits, feats = _plain(target, layers, torch.stack(seqs)[:, :-1])
            with torch.no_grad():
                want, _, _ = ttt_loss(head, list(feats.chunk(3, -1)), target.tok_embeddings(torch.stack(seqs)[:, :-1]),
                                      logits, target.output.weight, cfg.draft_head)
            assert got == pytest.approx(float(want), rel=1e-5)
        else:  # positions 1..n-2 of each carry the loss: 10 and 5 of them
            assert got == pytest.approx((10 * single[0] + 5 * single[1]) / 15, rel=1e-5)


def test_one_process_serves_with_a_head_distills_saves_and_resumes(tmp_path):
    """`distill.draft = "head"` over a MoE target, trees [2, 1, 1], greedy, batches of 2: every answer is the
    target's greedy decoding; the head takes an update every 4 requests and the saved head is the last version;
    a rerun over a longer stream starts from it and goes on counting versions; `draft_head/` of a run serves as
    `distill.draft` as it is."""
    target_dir, target = make_run(tmp_path / "target", 32, 4, 0, moe_every=2)
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": f"r{i}", "tokens": [40 + i, 41, 42, 43, 44 + i]}) for i in range(12)]
    prompts.write_text("\n".join(lines[:8]) + "\n")
    args = [f"distill.prompts={str(prompts)!r}".replace("'", '"'), "distill.tree=[2,1,1]", "distill.greedy=true",
            "distill.batch_size=2", "distill.save_every=1", "distill.max_new_tokens=10", "distill.lr=1e-3"]
    first = distill.run(distill_cfg(tmp_path, target_dir, "head", *args), SINGLE)
    run_path = tmp_path / "runs" / "default"
    assert first["requests"] == 8 and first["draft_updates"] == 2 and first["mean_gamma"] == 6  # 2 + 2 + 2 nodes
    assert len(first["acceptance_by_position"]) == 3  # by depth
    updates = records(run_path, "draft_update")
    head, layers, meta = load_head(run_path / "draft_head")
    assert layers == [2, 2, 1] and (meta["version"], meta["updates"]) == (2, 2)
    assert weights_digest(head) == updates[-1]["digest"]
    prompts.write_text("\n".join(lines) + "\n")
    second = distill.run(distill_cfg(tmp_path, target_dir, "head", *args), SINGLE)
    assert second["requests"] == 4 and [u["version"] for u in records(run_path, "draft_update")] == [1, 2, 3]
    answered = [json.loads(line) for line in (run_path / "responses-rank0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in answered] == [f"r{i}" for i in range(12)]
    assert [r["draft_version"] for r in answered] == [0] * 4 + [1] * 4 + [2] * 4
    target.eval()
    with torch.no_grad():
        for r in answered:
            seq = torch.tensor([[40 + int(r["id"][1:]), 41, 42, 43, 44 + int(r["id"][1:])]])
            for _ in range(10):
                seq = torch.cat([seq, target(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
            assert r["tokens"] == seq[0, 5:].tolist(), r["id"]
    # a saved head serves another run as it is (static: online=false), chains of 4; and in dynamic trees of 6
    dyn = distill.run(distill_cfg(tmp_path / "dyn", target_dir, run_path / "draft_head", *args[:1],
                                  "distill.online=false", "distill.greedy=true", "distill.tree_nodes=6",
                                  "distill.tree_depth=3", "distill.tree_topk=2"), SINGLE)
    assert dyn["requests"] == 12 and dyn["mean_gamma"] == 6
    # its nodes valued by counted acceptance (the default): every round tested the root's children at least
    counted = dyn["tree_acceptance"]
    assert sum(v["tested"] for v in counted.values()) >= 12 * 0.999 ** 200 and \
        all(0.0 <= v["accepted"] <= 1.0 for v in counted.values()), counted
    dyn_answers = [json.loads(line) for line in (tmp_path / "dyn" / "runs" / "default" /
                                                  "responses-rank0.jsonl").read_text().splitlines()]
    assert {r["id"]: r["tokens"][:10] for r in dyn_answers} == {r["id"]: r["tokens"] for r in answered}  # greedy

    other = distill.run(distill_cfg(tmp_path / "other", target_dir, run_path / "draft_head", *args[:1],
                                    "distill.online=false"), SINGLE)
    assert other["requests"] == 12 and other["draft_updates"] == 0 and other["mean_gamma"] == 4
    assert "tree_acceptance" not in other  # chains: nothing counted


def test_head_settings_are_checked(tmp_path):
    target_dir, _ = make_run(tmp_path / "target", 32, 4, 0)
    draft_dir, _ = make_run(tmp_path / "draft", 16, 1, 1)
    with pytest.raises(ConfigError, match=r"distill.tree=\[2, 1\] needs a draft head as distill.draft"):
        distill_cfg(tmp_path, target_dir, draft_dir, "distill.tree=[2,1]")
    with pytest.raises(ConfigError, match=r"distill.gamma_by_cost=true with distill.tree is refused"):
        distill_cfg(tmp_path, target_dir, "head", "distill.gamma_by_cost=true", "distill.tree=[2]")
    with pytest.raises(ConfigError, match=r"distill.adaptive_gamma=true with distill.tree_nodes is refused"):
        distill_cfg(tmp_path, target_dir, "head", "distill.adaptive_gamma=true", "distill.tree_nodes=8",
                    "distill.greedy=true")
    with pytest.raises(ConfigError, match=r"gamma_min=3 > tree_nodes=2"):
        distill_cfg(tmp_path, target_dir, "head", "distill.gamma_by_cost=true", "distill.tree_nodes=2",
                    "distill.gamma_min=3", "distill.greedy=true")
    with pytest.raises(ConfigError, match=r"distill.tree_nodes=8 needs distill.greedy=true"):
        distill_cfg(tmp_path, target_dir, "head", "distill.tree_nodes=8")
    with pytest.raises(ConfigError, match=r"distill.tree_nodes=8 and distill.tree are two trees"):
        distill_cfg(tmp_path, target_dir, "head", "distill.tree_nodes=8", "distill.tree=[2]", "distill.greedy=true")
    with pytest.raises(ConfigError, match=r"distill.tree_value='probability' must be 'counted' or 'head'"):
        distill_cfg(tmp_path, target_dir, "head", "distill.tree_value=\"probability\"")
    with pytest.raises(ConfigError, match=r"distill.tree=\[2, 0\] must give >= 1 children"):
        distill_cfg(tmp_path, target_dir, "head", "distill.tree=[2,0]")
    small, _ = make_run(tmp_path / "small", 16, 4, 0)  # a head made for another target's widths
    model, _, _ = load_lm(small, torch.device("cpu"))
    from expertmesh.distill.head import save_head

    save_head(DraftHead(model.cfg, DraftHeadConfig()), [0, 1, 2], model.cfg, DraftHeadConfig(), tmp_path / "h", {})
    with pytest.raises(ConfigError, match=r"was made for another target: \(head, target\) \{'dim': \(16, 32\)"):
        distill.run(distill_cfg(tmp_path, target_dir, tmp_path / "h"), SINGLE)


@pytest.mark.parametrize("shape", ["chain", "dynamic tree"])
def test_a_heads_drafts_are_sized_by_the_measured_costs(tmp_path, shape):
    """`distill.gamma_by_cost` with a head: the head's own step is timed beside the target's passes (in the
    metrics), each round's chain lies within [gamma_min, gamma_max] (with `distill.tree_nodes`, each round's
    dynamic tree within [gamma_min, tree_nodes]), and greedy answers are the target's."""
    target_dir, target = make_run(tmp_path / "target", 32, 4, 0, moe_every=1)
    tree = ["distill.tree_nodes=4", "distill.tree_depth=3", "distill.tree_topk=2"] if shape != "chain" else []
    cfg = distill_cfg(tmp_path, target_dir, "head", 'distill.synthetic=["stdlib:4"]', "distill.batch_size=2",
                      "distill.gamma_by_cost=true", "distill.gamma_min=1", "distill.gamma=2", "distill.gamma_max=4",
                      "distill.greedy=true", "distill.online=false", *tree)
    summary = distill.run(cfg, SINGLE)
    costs = records(cfg.run_path, "spec_costs")[0]
    assert costs["draft_s"] > 0 and sorted(costs["verify_s"], key=int) == ["2", "3", "4", "5"]
    assert 1 <= summary["mean_gamma"] <= 4
    from expertmesh.data.tokenizer import ByteTokenizer
    from expertmesh.distill.stream import requests

    prompts = {r.index: r.tokens for r in requests(cfg.distill, ByteTokenizer(), cfg.train.seed)}
    target.eval()
    for r in map(json.loads, (cfg.run_path / "responses-rank0.jsonl").read_text().splitlines()):
        assert r["rounds"] <= r["drafted"] <= 4 * r["rounds"]
        seq = torch.tensor([prompts[r["index"]]])
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, target(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert r["tokens"] == seq[0, -12:].tolist()


def test_a_fine_tune_of_an_imported_moe_grows_a_head_that_distill_serves(hf_dirs, tmp_path):
    """`expertmesh run` over a Qwen3-MoE checkpoint (`model.hf_path`) with `draft_head.enabled` writes the head
    beside the run as a by-product; `expertmesh distill` serves the checkpoint with it as the draft (trees,
    greedy), and the answer is transformers' own greedy decoding of the checkpoint."""
    from hf_checkpoints import hf_greedy

    from expertmesh.dist.env import DistEnv
    from expertmesh.models.hf import load_config
    from expertmesh.train.loop import run

    path = hf_dirs["qwen3_moe"]
    run(load_config(None, [f'model.hf_path="{path}"', f'train.run_dir="{tmp_path / "ft"}"', "train.steps=3",
                           "checkpoint.enabled=false", "data.seq_len=32", "data.max_bytes=200000",
                           "train.eval_batches=2", "train.eval_every=1000", 'metrics.wandb_mode="disabled"',
                           "draft_head.enabled=true"]), DistEnv(0, 0, 1, 1, "single"))
    head_dir = tmp_path / "ft" / "default" / "draft_head"
    _, _, meta = load_head(head_dir)
    assert meta["step"] == 3 and meta["model"]["dim"] == load_config(None, [f'model.hf_path="{path}"']).model.dim
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "prompt": "hello world"}) + "\n")
    cfg = distill_cfg(tmp_path, path, head_dir, f'distill.prompts="{prompts}"', "distill.greedy=true",
                      "distill.tree=[2,1]", "distill.online=false")
    distill.run(cfg, SINGLE)
    (answer,) = [json.loads(line) for line in (cfg.run_path / "responses-rank0.jsonl").read_text().splitlines()]
    assert answer["tokens"] == hf_greedy(path, list(b"hello world"), 12)
