import pytest
import torch

from expertmesh import config
from expertmesh.models.transformer import Transformer
from expertmesh.moe import ops
from expertmesh.moe.router import TopKRouter

TINY = ["model.dim=32", "model.n_layers=3", "model.n_heads=2", "model.ffn_dim=48", "moe.num_experts=4",
        "moe.expert_dim=16", "model.vocab_size=256"]


def build(overrides=(), seed=0):
    cfg = config.load(None, [*TINY, *overrides, f"train.seed={seed}"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    return cfg, model


def test_meta_build_then_init_is_deterministic_and_finite():
    _, a = build(seed=5)
    _, b = build(seed=5)
    _, c = build(seed=6)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.isfinite(pa).all(), n
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.output.weight, c.output.weight)


def test_forward_shapes_and_moe_layout():
    cfg, model = build(["moe.every=2", "moe.shared_experts=1"])
    tokens = torch.randint(0, 256, (2, 10))
    logits, stats = model(tokens)
    assert logits.shape == (2, 10, 256)
    assert [b.is_moe for b in model.layers.values()] == [False, True, False]
    assert len(stats) == 1
    assert int(stats[0].tokens_per_expert_E.sum()) == 2 * 10 * cfg.moe.top_k
    assert model.layers["1"].ffn.experts.w1.shape == (4, 32, 16)  # [E, D, F]


def test_causal_future_tokens_do_not_change_the_past():
    _, model = build()
    tokens = torch.randint(0, 256, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    a, _ = model(tokens)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_reference_dispatch_combine_against_a_loop():
    torch.manual_seed(0)
    T, D, E, K = 37, 8, 5, 2
    x = torch.randn(T, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[3, 1] = -1  # a dropped slot
    w = torch.rand(T, K)
    x_sorted, counts, row_map = ops.dispatch_reference(x, idx, E)
    assert counts.tolist() == [int((idx == e).sum()) for e in range(E)]
    # Grouped by expert, token order inside an expert.
    expected_rows = [t for e in range(E) for t in range(T) for k in range(K) if idx[t, k] == e]
    torch.testing.assert_close(x_sorted, x[expected_rows])
    assert row_map[3, 1] == -1
    scale = torch.arange(1, x_sorted.shape[0] + 1, dtype=x.dtype)[:, None]
    out = ops.combine_reference(x_sorted * scale, row_map, w)
    loop = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            if row_map[t, k] >= 0:
                loop[t] += w[t, k] * x[t] * (row_map[t, k] + 1)
    torch.testing.assert_close(out, loop)


def test_reference_ops_reject_bad_indices():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\[-1, 3\]; found range \[0, 4\]"):
        ops.dispatch_reference(x, torch.tensor([[0], [4], [1], [2]]), 4)
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.dispatch_reference(x, torch.zeros(4, 1), 4)


def test_router_capacity_drops_lowest_scores_and_counts_them():
    torch.manual_seed(0)
    router = TopKRouter(dim=6, num_experts=4, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 1.0  # every token prefers expert 0, scored by x[:, 0]
    x = torch.randn(16, 6).abs()
    out = router(x)
    cap = router.capacity(16)  # ceil(0.5 * 16 * 1 / 4) = 2
    assert cap == 2
    kept = (out.topk_idx_TK[:, 0] == 0).nonzero().flatten()
    assert set(kept.tolist()) == set(x[:, 0].topk(cap).indices.tolist())
    assert int(out.dropped) == 16 - cap
    assert out.tokens_per_expert_E.tolist() == [cap, 0, 0, 0]
    assert (out.topk_w_TK[out.topk_idx_TK < 0] == 0).all()


def test_load_balance_loss_is_one_when_uniform_and_grows_when_skewed():
    router = TopKRouter(dim=4, num_experts=4, top_k=1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    balanced = router(torch.eye(4) * 10)
    assert balanced.aux_loss.item() == pytest.approx(1.0, abs=1e-3)
    skewed = router(torch.tensor([[10.0, 0, 0, 0]] * 4))
    assert skewed.aux_loss.item() > 3.5


def test_reference_combine_with_every_slot_dropped():
    """Found by the hypothesis test: an empty y_sorted used to be indexed."""
    w = torch.rand(3, 2, requires_grad=True)
    out = ops.combine_reference(torch.zeros(0, 4), torch.full((3, 2), -1), w)
    assert torch.equal(out, torch.zeros(3, 4))
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, 2))


def test_group_limited_routing_picks_experts_inside_the_best_groups():
    # sigmoid scores: group {0,1} sums s(9)+s(0) = 1.50, group {6,7} sums s(5)+s(4) = 1.98
    router = TopKRouter(dim=8, num_experts=8, top_k=2, n_groups=4, topk_groups=1, score_func="sigmoid")
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(8))
    x = torch.tensor([[0.0, 0, 0, 0, 0, 0, 5.0, 4.0],  # best group is {6, 7}
                      [9.0, 0, 0, 0, 0, 0, 5.0, 4.0]])  # expert 0 is best alone, group {6,7} is best
    out = router(x)
    assert sorted(out.topk_idx_TK[0].tolist()) == [6, 7]
    assert sorted(out.topk_idx_TK[1].tolist()) == [6, 7]  # group {6,7} (5+4) beats group {0,1} (9+0)
    free = TopKRouter(dim=8, num_experts=8, top_k=2, score_func="sigmoid")
    with torch.no_grad():
        free.gate.weight.copy_(torch.eye(8))
    assert sorted(free(x).topk_idx_TK[1].tolist()) == [0, 6]


def test_expert_bias_changes_selection_not_weights_and_balances_load():
    torch.manual_seed(0)
    router = TopKRouter(dim=4, num_experts=4, top_k=1, bias_update_rate=0.002, score_func="sigmoid")
    x = torch.randn(512, 4) + torch.tensor([2.0, 0, 0, 0])  # skewed towards some experts
    first = router(x).tokens_per_expert_E.float()
    imbalance = []
    for _ in range(1500):
        load = router(x).tokens_per_expert_E
        router.update_bias(load)
        imbalance.append(float(load.max() / load.float().mean()))
    assert first.max() / first.mean() > 2.0
    assert sum(imbalance[-50:]) / 50 < 1.15  # sign updates settle near balance, oscillating by a step
    out = router(x)
    scores = torch.sigmoid(router.gate(x))
    torch.testing.assert_close(out.topk_w_TK[:, 0], scores.gather(1, out.topk_idx_TK)[:, 0])  # unbiased weights
    assert router.expert_bias.abs().sum() > 0


def test_residual_moe_and_per_layer_expert_counts():
    cfg, model = build(["model.n_layers=4", "moe.every=2", "moe.residual=true", "moe.num_experts_per_layer=[4, 8]",
                        "moe.top_k=2"])
    moe = [b.ffn for b in model.layers.values() if b.is_moe]
    assert [m.num_experts for m in moe] == [4, 8]
    assert moe[0].residual_mlp is not None and moe[0].coefficient.weight.shape == (2, 32)
    logits, stats = model(torch.randint(0, 256, (2, 6)))
    assert [s.tokens_per_expert_E.numel() for s in stats] == [4, 8]
    logits.sum().backward()
    assert moe[1].coefficient.weight.grad.abs().sum() > 0 and moe[1].residual_mlp.w1.weight.grad.abs().sum() > 0
    with pytest.raises(config.ConfigError, match="has 1 entries but the model has 2 MoE layers"):
        config.load(None, ["model.n_layers=4", "moe.every=2", "moe.num_experts_per_layer=[4]"])


def test_layer_backends_agree():
    cfg, model = build(["moe.backend=reference"])
    _, fused = build(["moe.backend=cpp"])
    fused.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    a, _ = model(tokens)
    b, _ = fused(tokens)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_seeded_init_draws_any_slice_as_the_full_tensor():
    """A rank's slice (some experts, part of F; part of a matrix) equals that slice of the whole tensor."""
    from expertmesh.models.init import SeededInit

    cfg = config.load(None, TINY)
    init = SeededInit(cfg.model, seed=7)
    full = init.draw("layers.0.ffn.experts.w1", (4, 32, 16), (slice(0, 4), slice(0, 32), slice(0, 16)))
    part = init.draw("layers.0.ffn.experts.w1", (4, 32, 16), (slice(1, 3), slice(0, 32), slice(8, 16)))
    assert torch.equal(part, full[1:3, :, 8:16])
    wq = init.draw("layers.0.attention.wq.weight", (32, 32), (slice(0, 32), slice(0, 32)))
    assert torch.equal(init.draw("layers.0.attention.wq.weight", (32, 32), (slice(16, 32), slice(0, 32))), wq[16:])
    assert not torch.equal(full[0], full[1])  # each expert its own draw
    other = SeededInit(cfg.model, seed=8).draw("layers.0.attention.wq.weight", (32, 32), (slice(0, 32), slice(0, 32)))
    assert not torch.equal(wq, other)
    assert torch.equal(init.draw("norm.weight", (32,), (slice(0, 32),)), torch.ones(32))
    init.BLOCK_VALUES = 64  # 2 rows of 32 per generator: slices across block boundaries
    emb = init.draw("tok_embeddings.weight", (9, 32), (slice(0, 9), slice(0, 32)))
    assert torch.equal(init.draw("tok_embeddings.weight", (9, 32), (slice(3, 8), slice(4, 20))), emb[3:8, 4:20])
    assert init.draw("tok_embeddings.weight", (9, 32), (slice(5, 5), slice(0, 32))).shape == (0, 32)
    assert emb.std() > 0.5  # the embedding's own rule (std 1)


@pytest.mark.parametrize("variant", [
    ["model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12", 'model.qk_norm="head"', "model.attn_bias=true",
     'model.rope_style="half"', 'model.rope_scaling="yarn"', "model.rope_factor=4.0",
     "model.rope_original_max_seq_len=8", "moe.shared_experts=1", "moe.shared_gate=true", "moe.first_k_dense=1"],
    ['model.qk_norm="full"', "model.clip_qkv=0.5", 'moe.score_func="sigmoid"', "moe.n_groups=2",
     "moe.routed_scaling_factor=2.5"],
    ['model.attention="mla"', "model.n_heads=4", "model.q_lora_rank=8", "model.kv_lora_rank=12",
     "model.qk_rope_head_dim=4", "model.qk_nope_head_dim=6", "model.v_head_dim=10", 'model.rope_scaling="yarn"',
     "model.rope_factor=2.0", "model.rope_original_max_seq_len=8", "model.rope_mscale_all_dim=1.0"],
])
def test_architecture_options_decode_with_the_cache_as_in_one_pass(variant):
    """Prefix, then one token at a time through the KV cache: the logits of one full forward."""
    cfg, model = build(variant)
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.make_cache()
        steps = [model(tokens[:, :6], cache=cache)[0]]
        steps += [model(tokens[:, i:i + 1], cache=cache)[0] for i in range(6, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert [b.is_moe for b in model.layers.values()][0] == ("moe.first_k_dense=1" not in variant)


def _layer_by_loop(layer, x_TD):
    """The MoE layer written token by token and expert by expert: softmax scores, the balancing bias in the
    choice only, normalized top-k weights, per-expert capacity keeping the highest-scored slots (ties: the
    earlier slot), each expert a SwiGLU, PR-MoE's two-way mix with a dense MLP, the shared expert added."""
    import torch.nn.functional as F

    r = layer.router
    T, K, E = x_TD.shape[0], r.top_k, layer.num_experts
    scores = [F.linear(x_TD[t], r.gate.weight).float().softmax(-1) for t in range(T)]
    slots = []  # (token, k, expert, weight, score)
    for t in range(T):
        choice = sorted(range(E), key=lambda e: -(scores[t][e].item() + r.expert_bias[e].item()))[:K]
        total = sum(scores[t][e] for e in choice)
        slots += [(t, k, e, scores[t][e] / total, scores[t][e].item()) for k, e in enumerate(choice)]
    cap = r.capacity(T) if r.capacity_factor > 0 else T * K
    kept, used = [], [0] * E
    for slot in sorted(slots, key=lambda s: -s[4]):  # stable: equal scores keep the token order
        if used[slot[2]] < cap:
            used[slot[2]] += 1
            kept.append(slot)

    def swiglu(x, w1, w3, w2):
        return (F.silu(x @ w1) * (x @ w3)) @ w2

    ex = layer.experts
    rows = []
    for t in range(T):
        y = sum((w * swiglu(x_TD[t], ex.w1[e], ex.w3[e], ex.w2[e]) for tt, _, e, w, _ in kept if tt == t),
                torch.zeros_like(x_TD[t]))
        if layer.residual_mlp is not None:
            c = F.linear(x_TD[t], layer.coefficient.weight).softmax(-1)
            y = c[0] * y + c[1] * layer.residual_mlp(x_TD[t])
        if layer.shared is not None:
            y = y + layer.shared(x_TD[t])
        rows.append(y)
    return torch.stack(rows), T * K - len(kept)


@pytest.mark.parametrize("features", [[], ["moe.capacity_factor=1.0"], ["moe.residual=true"],
                                      ["moe.shared_experts=1"], "all"])
def test_moe_layer_equals_a_loop_over_tokens_and_experts(features):
    """Output and every gradient of the layer (capacity dropping, bias balancing, PR-MoE, a shared expert, each
    alone and all together) against the loop; the balancing bias is set by hand so it changes the choice."""
    from combinations import LAYER_FEATURES

    from expertmesh.moe.layer import MoELayer

    cfg = config.load(None, ["moe.num_experts=4", "moe.top_k=2", "moe.expert_dim=8", "moe.bias_update_rate=0.01",
                             *(LAYER_FEATURES if features == "all" else features)])
    torch.manual_seed(3)
    layer = MoELayer(16, cfg.moe)
    layer.init_weights(0.3, 0.3)
    layer.router.expert_bias.copy_(torch.tensor([0.2, -0.1, 0.0, 0.05]))
    x = torch.randn(2, 5, 16, requires_grad=True)
    out, stats = layer(x)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), params)
    ref, dropped = _layer_by_loop(layer, x.view(10, 16))
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, 16)).sum(), params, allow_unused=True)
    assert int(stats.dropped) == dropped and (dropped > 0) == ("capacity" in str(features) or features == "all")
    torch.testing.assert_close(out.view(10, 16), ref, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip([("x", x), *layer.named_parameters()], grads, ref_grads, strict=True):
        r = torch.zeros_like(g) if r is None else r  # the loop never reads what the layer does not use
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

