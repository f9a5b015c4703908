"""The draft head's training-time test: what the unrolled training computes equals drafting token by token."""

import pytest
import torch

from expertmesh import config
from expertmesh.config import ConfigError, DraftHeadConfig, ModelConfig
from expertmesh.config.checks import draft_head_layers
from expertmesh.distill.head import DraftHead, ttt_loss, ttt_mask


def test_ttt_mask_by_hand():
    # step 2 at S=4: target-fed keys up to p-2, then the chain's own keys at p-1 (step 1) and p (step 2)
    want = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                         [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
                         [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
                         [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(ttt_mask(4, 2), want)
    assert torch.equal(ttt_mask(5, 0), torch.ones(5, 5, dtype=torch.bool).tril())


def _causal(head, x_BSD):
    """The head's layers over a plain sequence, causally, with no earlier passes."""
    S = x_BSD.shape[1]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for layer in head.layers:
        x_BSD = layer(x_BSD, head.rope_cos[:S], head.rope_sin[:S], [], mask)
    return x_BSD


@pytest.mark.parametrize("decoder_layers", [1, 2])
def test_unrolled_steps_equal_drafting_token_by_token(decoder_layers):
    """Step j at position p of the unrolled training = the head drafting j+1 tokens after position p-j: the
    context fed by the target's features, then its own outputs, one token at a time (float64)."""
    m = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48)
    h = DraftHeadConfig(enabled=True, decoder_layers=decoder_layers, ttt_steps=4)
    torch.manual_seed(0)
    head = DraftHead(m, h).double()
    B, S, D, V = 2, 9, 32, 50
    feats = [torch.randn(B, S, D, dtype=torch.float64) for _ in range(3)]
    emb_next = torch.randn(B, S, D, dtype=torch.float64)
    lm_head = torch.randn(V, D, dtype=torch.float64)
    with torch.no_grad():
        got = head.unrolled(feats, emb_next, lm_head, h.ttt_steps)
        context = head.inputs(head.fuse(torch.cat(feats, -1)), emb_next)
        for t in range(S):
            x = context[:, :t + 1]
            out = _causal(head, x)[:, -1:]
            for j in range(min(h.ttt_steps, S - t)):
                if j:  # the chain's next input: its own last output, the next token's embedding
                    x = torch.cat([x, head.inputs(out, emb_next[:, t + j:t + j + 1])], 1)
                    out = _causal(head, x)[:, -1:]
                torch.testing.assert_close(got[j][:, t + j], head.logits(out, lm_head)[:, 0], rtol=1e-12,
                                           atol=1e-12, msg=f"step {j} from position {t}")


def test_ttt_loss_trains_each_step_on_the_next_position():
    """With a head that copies the target's distribution exactly the loss is zero; it counts each step at
    positions j..S-2 against the target one position on."""
    h = DraftHeadConfig(enabled=True, ttt_steps=2, step_decay=0.5)
    head = DraftHead(ModelConfig(dim=16, n_heads=2, ffn_dim=16), h)
    B, S = 1, 6
    feats = [torch.randn(B, S, 16) for _ in range(3)]
    emb = torch.randn(B, S, 16)
    lm_head = torch.randn(11, 16)
    with torch.no_grad():
        steps = head.unrolled([f[:, :-1] for f in feats], emb[:, 1:], lm_head, 2)
    # a target whose distribution at p+1 is what step 0 gives at p: step 0's loss is zero, step 1's is not
    target = torch.cat([torch.zeros(B, 1, 11), steps[0]], 1)
    loss, per_step, agree = ttt_loss(head, feats, emb, target, lm_head, h)
    assert per_step[0].item() == pytest.approx(0.0, abs=1e-6) and agree[0].item() == 1.0
    assert per_step[1].item() > 1e-3
    assert loss.item() == pytest.approx((per_step[0] + 0.5 * per_step[1]).item() / 1.5, rel=1e-6)


def test_draft_head_config_is_checked():
    assert draft_head_layers(config.load(None, ["model.n_layers=8"])) == [2, 4, 5]
    assert draft_head_layers(config.load(None, ["model.n_layers=2"])) == [1, 1, 0]
    with pytest.raises(ConfigError, match=r"draft_head.layers=\[0, 9, 1\] must name three blocks"):
        config.load(None, ["draft_head.enabled=true", "draft_head.layers=[0,9,1]"])
    with pytest.raises(ConfigError, match="parallel.pp > 1 with draft_head.enabled=true is refused"):
        config.load(None, ["draft_head.enabled=true", "parallel.pp=2", "model.n_layers=4"])
    with pytest.raises(ConfigError, match="diloco.enabled=true with draft_head.enabled=true is refused"):
        config.load(None, ["draft_head.enabled=true", "diloco.enabled=true", "parallel.dp_replicate=2"])
    for every in (0, 11):
        with pytest.raises(ConfigError, match=rf"draft_head.every={every} must be in \[1, train.steps=10\]"):
            config.load(None, ["draft_head.enabled=true", f"draft_head.every={every}", "train.steps=10"])


def _target_and_head(vocab=256, layers=3, seed=0):
    from expertmesh.config import JobConfig, MoEConfig
    from expertmesh.models.transformer import Transformer

    cfg = JobConfig(model=ModelConfig(dim=32, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=vocab,
                                      max_seq_len=64), moe=MoEConfig(num_experts=4, expert_dim=32, every=2))
    torch.manual_seed(seed)
    target = Transformer(cfg)
    target.init_weights()
    head = DraftHead(cfg.model, DraftHeadConfig(enabled=True, decoder_layers=2))
    return target.eval(), head, draft_head_layers(cfg)


@pytest.mark.parametrize("tree", [None, [3, 2, 1], (8, 4, 3), "by cost", "counted"],
                         ids=["chain", "tree", "dynamic", "by-cost", "counted"])
def test_head_drafting_greedy_equals_the_targets_greedy_decoding(tree):
    """Chains (gamma 3), static trees or dynamic trees (8 nodes of 4 levels of top-3 expansions, or as many of
    them as a `CostTree` finds worth verifying) drafted by an (untrained) head and verified by the target: the
    output is the target's own greedy decoding token for token, for every request of a lockstep batch, whatever
    the head proposes."""
    from expertmesh.distill.head import Acceptance, head_generate
    from expertmesh.distill.speculative import CostTree

    acceptance = Acceptance() if tree == "counted" else None
    if tree == "counted":
        tree = (8, 8, 3)
    if tree == "by cost":
        rule = CostTree({"draft_s": 0.01, "verify_s": {n: 0.1 + 0.02 * n for n in range(2, 10)}}, 1, 8)
        tree = (rule, 4, 3)
    target, head, layers = _target_and_head()
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, target(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
        out, stats = head_generate(target, head, layers, prompt, 12, gamma=3, greedy=True, acceptance=acceptance,
                                   **({"dynamic": tree} if isinstance(tree, tuple) else {"tree": tree}))
    assert torch.equal(out, seq[:, 5:])
    assert stats.rounds >= 12 / 4 and stats.emitted >= 12 * 3
    if acceptance is not None:  # every round tested the root's children at least, for each of the 3 requests
        assert acceptance.tested.sum() >= 3 * stats.rounds * 0.99 ** stats.rounds


@pytest.mark.parametrize("tree", [None, [3, 2]], ids=["chain", "tree"])
def test_head_drafting_samples_the_targets_distribution(tree):
    """Sampling: two tokens after a prompt, drawn by 4000 requests in one lockstep batch, against the target's
    exact distribution over the 8 x 8 pairs (chi-square, 63 degrees of freedom, p = 0.001 at 103.4). Trees
    draw 3 candidates for the first token, 2 for the second, from the head's q (several of them often the same
    token); chains one."""
    from expertmesh.distill.head import head_generate

    target, head, layers = _target_and_head(vocab=8, seed=3)
    prompt = torch.tensor([[1, 5, 2, 7]]).repeat(4000, 1)
    with torch.no_grad():
        out, _ = head_generate(target, head, layers, prompt, 2, gamma=2, tree=tree,
                               generator=torch.Generator().manual_seed(5))
        p1 = target(prompt[:1])[0][0, -1].double().softmax(-1)
        pairs = torch.cat([prompt[:1].repeat(8, 1), torch.arange(8)[:, None]], 1)
        p2 = target(pairs)[0][:, -1].double().softmax(-1)
    exact = (p1[:, None] * p2).flatten()
    seen = torch.bincount(out[:, 0] * 8 + out[:, 1], minlength=64).double()
    expected = exact * 4000
    chi2 = ((seen - expected) ** 2 / expected).sum().item()
    assert chi2 < 103.4, chi2


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_a_tree_forward_scores_each_node_as_its_own_sequence(variant):
    """The target over a tree of tokens after a cached prefix (tree positions, ancestor mask): each node's
    logits equal a plain forward of the prefix and the node's path; keeping one path in the cache, decoding
    goes on as if only that path had been fed (grouped-query attention, and multi-head latent attention)."""
    from expertmesh.config import JobConfig, MoEConfig
    from expertmesh.distill.head import Tree
    from expertmesh.models.transformer import Transformer

    extra = dict(attention="mla", q_lora_rank=8, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=12) if variant == "mla" else dict(n_kv_heads=2)
    cfg = JobConfig(model=ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=64, **extra),
                    moe=MoEConfig(num_experts=4, expert_dim=32, every=2))
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    model.init_weights()
    model.double()
    tree = Tree([2, 2])
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 256, (2, 6), generator=g)
    tokens = torch.randint(0, 256, (2, tree.size + 1), generator=g)  # slot 0: the token after the prefix
    with torch.no_grad():
        cache = model.make_cache()
        model(prefix, cache)
        got, _ = model(tokens, cache, tree=(torch.tensor(tree.depth), tree.ancestors))
        for slot in range(tree.size + 1):
            path = [a for a in range(slot + 1) if tree.ancestors[slot, a]]
            want, _ = model(torch.cat([prefix, tokens[:, path]], 1))
            torch.testing.assert_close(got[:, slot], want[:, -1], rtol=1e-10, atol=1e-10, msg=f"slot {slot}")
        leaf = tree.levels[-1][-1]
        path = [a for a in range(leaf + 1) if tree.ancestors[leaf, a]]
        cache.keep(torch.cat([torch.arange(6), 6 + torch.tensor(path)]).expand(2, -1))
        nxt = torch.randint(0, 256, (2, 1), generator=g)
        got, _ = model(nxt, cache)
        want, _ = model(torch.cat([prefix, tokens[:, path], nxt], 1))
    torch.testing.assert_close(got[:, -1], want[:, -1], rtol=1e-10, atol=1e-10)


def test_tree_shape_by_hand():
    from expertmesh.distill.head import Tree

    t = Tree([2, 1])
    assert t.parent == [-1, 0, 0, 1, 2] and t.depth == [0, 1, 1, 2, 2] and t.levels == [[1, 2], [3, 4]]
    assert t.size == 4 and t.children[0] == [1, 2] and t.children[2] == [4]
    assert t.ancestors[4].tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="children each"):
        Tree([2, 0])


def test_the_metrics_line_shows_the_head():
    from expertmesh.metrics import format_line

    rec = {"step": 5, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "aux_loss": 1.0, "dropped_tokens": 0,
           "comm_bytes_per_step": {}, "draft_head": {"loss": 0.4321, "top1_by_step": [0.76, 0.7]}}
    assert format_line(rec, 10).endswith("| head 0.432 top1 0.76")


def test_a_dynamic_tree_goes_deep_where_the_head_is_sure_and_branches_where_it_is_not():
    """`_draft_dynamic` with the head's q fixed (every node alike): q = (0.9, 0.06, ...) makes the 4 most probable
    paths the chain of top-1 tokens (0.9, 0.81, 0.73, 0.66 against 0.06 for the runner-up); q = (0.5, 0.3, 0.2)
    makes the 3 nodes the root's two children and the first one's child (0.5, 0.3, 0.25)."""
    from expertmesh.distill.head import _draft_dynamic

    target, head, layers = _target_and_head(vocab=8)
    for q_fixed, nodes, want_parents, want_tokens in (([0.9, 0.06, 0.04], 4, [-1, 0, 1, 2, 3], [5, 0, 0, 0, 0]),
                                                       ([0.5, 0.3, 0.2], 3, [-1, 0, 0, 1], [5, 0, 1, 0])):
        q = torch.tensor(q_fixed + [0.0] * 5, dtype=torch.float64)
        root = torch.tensor([5, 5])
        with torch.no_grad():
            out = head.inputs(torch.zeros(2, 1, 32), target.tok_embeddings(root[:, None]))
            shape, tokens, qs = _draft_dynamic(head, out, root, 0, [None] * len(head.layers), (nodes, 4, 2),
                                               target.tok_embeddings, lambda o, q=q: q.expand(*o.shape[:2], -1),
                                               torch.float32)
        assert shape.parent == want_parents and tokens[0].tolist() == want_tokens == tokens[1].tolist()
        assert torch.equal(qs[0, 0], q) and (qs[:, [s for s in range(nodes + 1) if not shape.children[s]]] == 0).all()


def test_acceptance_counts_the_tested_nodes_of_a_verified_tree_by_rank_and_probability():
    """`Acceptance.observe_round` on a tree [2, 1] (slots 1, 2 under the root; 3 under 1, 4 under 2) whose
    accepted path is 2 -> 4: nodes 1, 2 (the root's children) and 4 (the accepted 2's child) were tested, node 3
    (under the rejected 1) was not. With q(1) = 0.62 (rank 1), q(2) = 0.33 (rank 2), q(4) = 0.97 (rank 1):
    rank 1 bins [0.6, 0.7) 1 test 0 accepted and [0.95, 1] 1 test 1 accepted, rank 2 [0.3, 0.4) 1 test 1
    accepted, nothing else. Before any test a node's value is the head's q; after, (accepted + 2 q) / (tested + 2)."""
    from expertmesh.distill.head import Acceptance, Tree

    acc = Acceptance()
    q_probe = torch.tensor([0.33, 0.62, 0.97, 0.15], dtype=torch.float64)
    assert torch.equal(acc(q_probe, 1), q_probe)
    shape = Tree([2, 1])
    assert shape.parent == [-1, 0, 0, 1, 2]
    tokens = torch.tensor([[7, 3, 4, 5, 6]])
    q = torch.zeros(1, 5, 8, dtype=torch.float64)
    q[0, 0, [3, 4, 0]] = torch.tensor([0.62, 0.33, 0.05], dtype=torch.float64)
    q[0, 1, [5, 1]] = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q[0, 2, [6, 2]] = torch.tensor([0.97, 0.03], dtype=torch.float64)
    acc.observe_round(shape, tokens, q, [[2, 4]])
    want_tested = torch.zeros(3, 12, dtype=torch.float64)
    want_accepted = torch.zeros(3, 12, dtype=torch.float64)
    want_tested[0, 7] = want_tested[0, 11] = want_tested[1, 4] = 1.0  # bins: 0.62 -> 7, 0.97 -> 11, 0.33 -> 4
    want_accepted[0, 11] = want_accepted[1, 4] = 1.0
    assert torch.equal(acc.tested, want_tested) and torch.equal(acc.accepted, want_accepted)
    got = acc(torch.tensor([0.65, 0.99, 0.35, 0.35], dtype=torch.float64), torch.tensor([1, 1, 2, 1]))
    want = torch.tensor([(0 + 2 * 0.65) / 3, (1 + 2 * 0.99) / 3, (1 + 2 * 0.35) / 3, 0.35], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-15)  # float64: the same formula, its ops ordered apart (~1e-16)
    by_rank = Acceptance.by_rank([acc.table(), acc.table()])  # two servers' counts: rank 1 tested 2 x 2, 1 kept
    assert by_rank == {"rank 1": {"accepted": 0.5, "tested": 4.0}, "rank 2": {"accepted": 1.0, "tested": 2.0},
                       "rank 3+": {"accepted": 0.0, "tested": 0.0}}
    acc.observe_round(shape, tokens, q, [[]])  # nothing accepted: the root's children tested again, decayed once
    assert acc.tested[0, 7].item() == pytest.approx(0.999 + 1) and acc.accepted[1, 4].item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="decay=1.5"):
        Acceptance(decay=1.5)


def test_a_dynamic_tree_valued_by_counted_acceptance_follows_a_head_surer_than_it_says():
    """The head's q fixed at (0.5, 0.3, 0.2) for every node: by the head's probabilities (EAGLE-2) 4 nodes are the
    root's 2 children and the first's 2 (0.5, 0.3, 0.25, 0.15); counted as a target that accepts the head's
    top-1 token 19 times in 20 and its runner-up 1 in 50, the 4 are the chain of top-1 tokens."""
    from expertmesh.distill.head import Acceptance, _draft_dynamic

    target, head, layers = _target_and_head(vocab=8)
    q = torch.tensor([0.5, 0.3, 0.2] + [0.0] * 5, dtype=torch.float64)
    acc = Acceptance()
    for rank, qv, n_acc in ((1, 0.5, 190), (2, 0.3, 4)):
        acc.observe(torch.full((200,), qv, dtype=torch.float64), torch.full((200,), rank),
                    torch.arange(200) < n_acc)
    root = torch.tensor([5, 5])
    for acceptance, want_parents in ((None, [-1, 0, 0, 1, 1]), (acc, [-1, 0, 1, 2, 3])):
        with torch.no_grad():
            out = head.inputs(torch.zeros(2, 1, 32), target.tok_embeddings(root[:, None]))
            shape, _, _ = _draft_dynamic(head, out, root, 0, [None] * len(head.layers), (4, 4, 2),
                                         target.tok_embeddings, lambda o: q.expand(*o.shape[:2], -1),
                                         torch.float32, acceptance)
        assert shape.parent == want_parents


def test_a_cost_tree_drafts_and_verifies_what_pays_for_its_pass():
    """`_draft_dynamic` sized by a `CostTree`, the head's q fixed at (0.9, 0.06, 0.04) with top-2 growth: level 1
    holds 0.9 and 0.06, every deeper level d holds 0.9^d, 0.9^(d-1) 0.06 (twice) and 0.9^(d-2) 0.06^2 (the
    children of the level before's two likeliest). Verifying n nodes of a tree grown d levels earns 1 + their
    sum for d draft_s + verify_s[n + 1] seconds; with q fixed the rule's guess of the next level is exact, so it
    grows to the first depth whose best rate the next would not beat (or the 4 allowed) and verifies that
    depth's best n, as counted here by brute force: a flat pass verifies all 8 allowed of 4 levels; one growing
    by 0.01 s a token (a MoE pass waking experts) the chain of 4 top-1 tokens; by 0.1 s a token, 1 node of 1
    level; a head step costing half a flat pass, 8 of 3 levels; costing 0.8 of it, 6 of 2 levels."""
    from expertmesh.distill.head import _draft_dynamic
    from expertmesh.distill.speculative import CostTree

    def level(d):
        return [0.9, 0.06] if d == 1 else [0.9**d, 0.9**(d - 1) * 0.06, 0.9**(d - 1) * 0.06, 0.9**(d - 2) * 0.0036]

    def brute(draft_s, verify_s):
        def rate(d):
            scores = sorted(sum((level(i) for i in range(1, d + 1)), []), reverse=True)
            return max(((1 + sum(scores[:n])) / (d * draft_s + verify_s[n + 1]), n)
                       for n in range(1, min(8, len(scores)) + 1))
        d = next((d for d in range(1, 4) if rate(d + 1)[0] <= rate(d)[0]), 4)
        return d, rate(d)[1]

    target, head, layers = _target_and_head(vocab=8)
    q = torch.tensor([0.9, 0.06, 0.04] + [0.0] * 5, dtype=torch.float64)
    root = torch.tensor([5, 5])
    for draft_s, grow, want in ((0.0, 0.0, (4, 8)), (0.0, 0.01, (4, 4)), (0.0, 0.1, (1, 1)), (0.05, 0.0, (3, 8)),
                                 (0.08, 0.0, (2, 6))):
        verify_s = {n: 0.1 + grow * (n - 1) for n in range(2, 10)}
        assert brute(draft_s, verify_s) == want
        rule = CostTree({"draft_s": draft_s, "verify_s": verify_s}, 1, 8)
        with torch.no_grad():
            out = head.inputs(torch.zeros(2, 1, 32), target.tok_embeddings(root[:, None]))
            shape, tokens, _ = _draft_dynamic(head, out, root, 0, [None] * len(head.layers), (rule, 4, 2),
                                              target.tok_embeddings, lambda o: q.expand(*o.shape[:2], -1),
                                              torch.float32)
        assert (rule.depth, shape.size) == (rule.depth, rule.nodes) == want, (draft_s, grow)
        assert len(shape.levels) <= rule.depth
        if want == (4, 4):  # the chain of top-1 tokens
            assert shape.parent == [-1, 0, 1, 2, 3] and tokens[0, 1:].tolist() == [0] * 4


def test_a_cost_tree_verifies_in_order_of_calibrated_value():
    """The head's q fixed at (0.5, 0.3, 0.2), top-2 growth, 3 nodes verified: taken at its word the head's three
    likeliest paths are the root's two children and the first one's child (0.5, 0.3, 0.25); calibrated by depth
    (c = 1, 2, 4: rounds kept deep drafts more often than it said) the first child's chain is worth 0.5 at every
    depth and the runner-up 0.3, so the three nodes are the chain."""
    from expertmesh.distill.head import _draft_dynamic
    from expertmesh.distill.speculative import CostTree

    target, head, layers = _target_and_head(vocab=8)
    q = torch.tensor([0.5, 0.3, 0.2] + [0.0] * 5, dtype=torch.float64)
    root = torch.tensor([5, 5])
    for calibration, parents in (([], [-1, 0, 0, 1]), ([1.0, 2.0, 4.0], [-1, 0, 1, 2])):
        rule = CostTree({"draft_s": 0.0, "verify_s": {n: 0.1 for n in range(2, 5)}}, 1, 3)
        rule.calibration = calibration
        with torch.no_grad():
            out = head.inputs(torch.zeros(2, 1, 32), target.tok_embeddings(root[:, None]))
            shape, tokens, _ = _draft_dynamic(head, out, root, 0, [None] * len(head.layers), (rule, 3, 2),
                                              target.tok_embeddings, lambda o: q.expand(*o.shape[:2], -1),
                                              torch.float32)
        assert shape.parent == parents, calibration
