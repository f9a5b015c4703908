"""KV-cached decoding equals full forwards; greedy speculative decoding equals the target's own greedy
decoding token for token (float64); sampled speculative decoding runs batched and counts what it did."""

import pytest
import torch
from helpers import chi2_pvalue

from expertmesh import config
from expertmesh.distill.speculative import speculative_generate
from expertmesh.models.transformer import KVCache, Transformer


def _model(dim, layers, seed, moe=True):
    cfg = config.load(None, [f"model.dim={dim}", f"model.n_layers={layers}", "model.n_heads=2",
                             "model.ffn_dim=64", "moe.num_experts=4", "moe.expert_dim=16",
                             f"moe.every={1 if moe else 99}", "model.max_seq_len=128"])
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.init_weights()
    return m.double().eval()


def test_cached_decoding_equals_full_forward():
    model = _model(32, 2, 0)
    tokens = torch.randint(0, 256, (3, 20))
    full, _ = model(tokens)
    cache = KVCache()
    parts = [model(tokens[:, :7], cache)[0], model(tokens[:, 7:8], cache)[0], model(tokens[:, 8:20], cache)[0]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    cache.crop(8)  # drop 12 positions, then feed them again: the same logits
    torch.testing.assert_close(model(tokens[:, 8:20], cache)[0], full[:, 8:20], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(99)


def _greedy(model, prompt, n):
    seq = prompt
    for _ in range(n):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculative_equals_target_greedy(gamma):
    target, draft = _model(32, 2, 0), _model(16, 1, 1, moe=False)
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(2))
    want = _greedy(target, prompt, 24)
    got, stats = speculative_generate(target, draft, prompt, 24, gamma, greedy=True)
    assert torch.equal(got, want)
    assert stats.target_forwards == stats.rounds and stats.drafted == gamma * 3 * stats.rounds
    # the target drafting for itself: every draft accepted, gamma + 1 tokens per target forward
    got, stats = speculative_generate(target, target, prompt, 24, gamma, greedy=True)
    assert torch.equal(got, want)
    assert stats.accepted == stats.drafted and stats.tokens_per_target_forward == pytest.approx(gamma + 1, rel=0.25)


def test_sampled_speculative_runs_batched():
    target, draft = _model(32, 2, 0), _model(16, 1, 1, moe=False)
    prompt = torch.randint(0, 256, (4, 3), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    out, stats = speculative_generate(target, draft, prompt, 16, 4, generator=g)
    assert out.shape == (4, 16) and 0 <= stats.accepted <= stats.drafted and 0 < stats.alpha <= 1
    assert stats.tokens_per_target_forward >= 1
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, draft, prompt, 16, 0)


def test_lockstep_batch_keeps_the_first_token_distribution():
    """4000 copies of one prompt in one batch: the round keeps the fewest accepted drafts (0 here), and
    rows that accepted more emit their own accepted draft; the first tokens must still follow p."""
    target, draft = _model(32, 2, 0), _model(16, 1, 1, moe=False)
    with torch.no_grad():  # peaked distributions, so that p and q differ clearly
        target.output.weight.mul_(8)
        draft.output.weight.mul_(8)
    prompt = torch.tensor([[5, 17, 99]]).expand(4000, 3)
    with torch.no_grad():
        p = torch.softmax(target(prompt[:1])[0][0, -1].double(), -1)
        q = torch.softmax(draft(prompt[:1])[0][0, -1].double(), -1)
    out, _ = speculative_generate(target, draft, prompt, 1, 3,
                                  generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(out[:, 0], minlength=256)
    assert chi2_pvalue(counts, p) > 0.01
    assert 0.5 * (p - q).abs().sum() > 0.2 and chi2_pvalue(counts, q) < 1e-6


def test_adaptive_gamma_follows_acceptance():
    from expertmesh.distill.speculative import AdaptiveGamma

    g = AdaptiveGamma(4, lo=2, hi=6, window=2)
    assert [g.update(f) for f in (1.0, 1.0, 0.9, 0.9, 0.9, 0.9)] == [4, 5, 5, 6, 6, 6]  # capped at hi
    assert [g.update(f) for f in (0.0, 0.1, 0.2, 0.1, 0.0, 0.0)] == [6, 5, 5, 4, 4, 3]
    with pytest.raises(ValueError, match="lo"):
        AdaptiveGamma(1, lo=2)
    target = _model(32, 2, 0)
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(1))
    adaptive = AdaptiveGamma(2, hi=5, window=1)  # the target drafting for itself: all kept, gamma grows
    _, stats = speculative_generate(target, target, prompt, 20, adaptive, greedy=True)
    assert adaptive.gamma == 5 and stats.accepted == stats.drafted


def test_cost_gamma_picks_the_most_tokens_per_second():
    """The rule against a brute-force count: expected tokens of a round (sum over i <= gamma of a^i) per second
    of it. A pass whose cost grows with its tokens (a MoE target waking more experts) gets shorter drafts than
    one that costs the same for 1 or 9 tokens, at the same acceptance."""
    from expertmesh.distill.speculative import CostGamma

    def brute(costs, a, lo, hi):
        return max(range(lo, hi + 1), key=lambda g: sum(a**i for i in range(g + 1)) /
                   (g * costs["draft_s"] + costs["verify_s"][g + 1]))

    flat = {"draft_s": 0.01, "verify_s": {n: 0.1 for n in range(1, 10)}}
    steep = {"draft_s": 0.01, "verify_s": {n: 0.1 * n for n in range(1, 10)}}
    for costs in (flat, steep):
        for a in (0.2, 0.5, 0.8, 0.95):
            assert CostGamma(costs, 1, 8, 4).best(a) == brute(costs, a, 1, 8), (a, costs)
    assert CostGamma(flat, 1, 8, 4).best(0.8) > CostGamma(steep, 1, 8, 4).best(0.8)
    rule = CostGamma(flat, 1, 8, 4, window=4)
    for _ in range(4):  # each round accepts 2 of 4 and then rejects: a = 2 / 3
        rule.update(0.5)
    assert rule.alpha == pytest.approx(2 / 3) and rule.gamma == brute(flat, 2 / 3, 1, 8)
    with pytest.raises(ValueError, match="verify costs"):
        CostGamma({"draft_s": 0.1, "verify_s": {2: 1.0}}, 1, 3, 2)


def test_cost_tree_picks_the_most_tokens_per_second_and_calibrates_the_heads_confidence_by_depth():
    """`CostTree` against a brute-force count over random path probabilities and costs; then calibration: a head
    whose depth-1 guesses are always kept (kept 1 each round) and deeper ones never learns c_1 = rounds over
    its depth-1 probability sums and c_2 = c_3 = 0, and from then on verifies its depth-1 node alone (4
    candidates before: 3.3 / 0.15 tokens per second against 1.9 / 0.12 for one)."""
    from expertmesh.distill.speculative import CostTree

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = sorted(torch.rand(12, generator=g).tolist(), reverse=True)
        grow = float(torch.rand((), generator=g)) * 0.05
        costs = {"draft_s": 0.003, "verify_s": {n: 0.05 + grow * n for n in range(1, 11)}}
        rule = CostTree(costs, 2, 9)
        want = max(range(2, 10), key=lambda n: (1 + sum(scores[:n])) / (0.009 + costs["verify_s"][n + 1]))
        assert rule.choose([(s, 1) for s in scores], 3) == want
        assert rule.predicted == [pytest.approx(sum(scores[:want]))]
    costs = {"draft_s": 0.0, "verify_s": {n: 0.1 + 0.01 * n for n in range(1, 11)}}
    rule, cands = CostTree(costs, 1, 9, window=4), [(0.9, 1), (0.6, 2), (0.5, 2), (0.3, 3)]
    assert rule.choose(cands, 3) == 4
    for _ in range(4):
        rule.choose(cands, 3)
        rule.update(1)
    assert rule.calibration == [pytest.approx(4 / 3.6), 0.0, 0.0] and rule.choose(cands, 3) == 1
    with pytest.raises(ValueError, match="verify costs"):
        CostTree({"draft_s": 0.1, "verify_s": {2: 1.0}}, 1, 3)


def test_a_head_surer_than_it_says_grows_deeper_trees():
    """`CostTree.deeper` after level 2 of a chain (probabilities 0.5, then 0.2; the next child guessed at 0.4 of
    its parent): a fresh rule takes the head at its word (0.5 + 0.2 + 0.08 tokens for a third level's
    0.06 + 0.12 s: 9.9 tokens/s, below 1.7 / 0.155 = 11.0 without it) and stops; after rounds that always
    kept both drafts (c_1 = 2, c_2 = 5, and every round that reached depth 1 reached 2) a third level is worth
    its parent's calibrated 1.0 (4 / 0.18 = 22.2 against 3 / 0.155 = 19.4), and it grows."""
    from expertmesh.distill.speculative import CostTree

    costs = {"draft_s": 0.02, "verify_s": {n: 0.1 + 0.005 * n for n in range(1, 11)}}
    cands, born = [(0.5, 1), (0.2, 2)], [(1, 0.5, 0.2)]
    fresh = CostTree(costs, 1, 8, window=4)
    assert not fresh.deeper(2, cands, born, 1)
    sure = CostTree(costs, 1, 8, window=4)
    for _ in range(4):
        sure.choose(cands, 2)
        sure.update(2)
    assert sure.calibration == [pytest.approx(2.0), pytest.approx(5.0)] and sure.go_on() == 1.0
    assert sure.deeper(2, cands, born, 1)


def test_measured_costs_never_fall_with_more_tokens():
    """`monotone` (pool adjacent violators) by hand: a timing below its predecessor's is pooled with it."""
    from expertmesh.distill.speculative import monotone

    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert monotone([5.0, 4.0, 3.0]) == [4.0, 4.0, 4.0]
    assert monotone([1.0, 4.0, 2.0, 3.0, 0.5]) == pytest.approx([1.0, 2.375, 2.375, 2.375, 2.375])
