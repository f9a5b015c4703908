"""Routing in fp32 whatever the compute dtype: given the same bf16 hidden states, our router under bf16
autocast picks the experts that transformers' bf16 model picks, on every token of every MoE layer.
DeepSeek-V3 routes in fp32 (logits from fp32 casts, sigmoid, correction bias, group-limited top-k);
Qwen3-MoE computes its logits in bf16 and the softmax in fp32, so it picks by index where two bf16
logits tie at the k-th place: those tokens (counted) are the only ones allowed to differ."""

import pytest
import torch
from hf_checkpoints import VOCAB, hf_model

from expertmesh.models.hf import load_pretrained


def _gate_calls(ref, x):
    """(input hidden states, transformers' logits, its chosen experts) of every MoE gate, in layer order."""
    calls, hooks = [], []
    for name, module in ref.named_modules():
        if name.endswith("mlp.gate") and type(module).__name__.endswith("Router"):
            hooks.append(module.register_forward_hook(
                lambda m, args, out: calls.append((args[0].detach().reshape(-1, args[0].shape[-1]), out[0], out[2]))))
    with torch.no_grad():
        ref(input_ids=x)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_bf16_routing_picks_the_experts_transformers_picks(hf_dirs, family):
    x = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(5))
    ref = hf_model(hf_dirs[family], dtype=torch.bfloat16)
    calls = _gate_calls(ref, x)
    ours = load_pretrained(hf_dirs[family])
    routers = [b.ffn.router for b in ours.layers.values() if b.is_moe]
    assert len(routers) == len(calls) > 0
    checked = ties = 0
    for router, (h_TD, logits_TE, want_TK) in zip(routers, calls, strict=True):
        assert h_TD.dtype == torch.bfloat16
        hf_gate = [m for n, m in ref.named_modules() if n.endswith("mlp.gate")][routers.index(router)]
        with torch.no_grad():
            router.gate.weight.copy_(hf_gate.weight.float())  # the bf16 model's gate, exactly
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = router(h_TD)
        assert got.topk_w_TK.dtype == torch.float32
        same = (got.topk_idx_TK.sort(-1).values == want_TK.sort(-1).values).all(-1)
        if family == "qwen3_moe":  # a bf16 tie at the k-th place: transformers picks the lower index
            k = want_TK.shape[1]
            top = logits_TE.float().topk(k + 1, dim=-1).values
            tie = top[:, k - 1] == top[:, k]
            ties += int(tie.sum())
            same |= tie
        assert same.all(), f"{int((~same).sum())} of {len(same)} tokens routed differently"
        checked += len(same)
    assert checked >= 4 * 64 and ties <= checked // 10


def test_router_weights_stay_fp32_with_a_bf16_gate_and_autocast():
    from expertmesh.moe.router import TopKRouter

    router = TopKRouter(16, 8, 2, score_func="sigmoid", n_groups=4, topk_groups=2)
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(32, 16)
    want = router(x)
    router.gate.weight.data = router.gate.weight.data.bfloat16().float()
    exact = router(x.bfloat16().float())
    router.gate.weight.data = router.gate.weight.data.bfloat16()  # as a bf16 parameter would be
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x.bfloat16())
    assert got.topk_w_TK.dtype == torch.float32 and want.topk_w_TK.dtype == torch.float32
    assert torch.equal(got.topk_idx_TK, exact.topk_idx_TK)
    torch.testing.assert_close(got.topk_w_TK, exact.topk_w_TK, rtol=0, atol=0)
