"""Online distillation from verification passes raises the draft's acceptance rate on the traffic it sees."""

import pytest
import torch

from expertmesh import config
from expertmesh.distill.online import OnlineDistiller, Recorder
from expertmesh.distill.speculative import speculative_generate
from expertmesh.models.transformer import Transformer


def _model(dim, layers, seed, sharpen=1.0):
    cfg = config.load(None, [f"model.dim={dim}", f"model.n_layers={layers}", "model.n_heads=2", "model.ffn_dim=64",
                             "moe.num_experts=4", "moe.expert_dim=16", "model.max_seq_len=128"])
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.init_weights()
    with torch.no_grad():
        m.output.weight.mul_(sharpen)
    return m.eval()


def _alpha(target, draft, prompts, seed):
    _, stats = speculative_generate(target, draft, prompts, 8, 4,
                                    generator=torch.Generator().manual_seed(seed))
    return stats.alpha


@pytest.mark.parametrize("positions", ["rejected", "all", "onpolicy"])
def test_acceptance_rises_with_online_distillation(positions):
    target, draft = _model(32, 2, 0, sharpen=6.0), _model(32, 1, 1)  # a MoE target, a 1-layer draft
    prompts = torch.randint(0, 256, (8, 4), generator=torch.Generator().manual_seed(2))
    before = _alpha(target, draft, prompts, 3)
    rec = Recorder(positions, topk=16)
    trainer = OnlineDistiller(draft, 256, "fkl", lr=1e-2, batch=32, steps=8, update_every=8)
    for r in range(15):
        speculative_generate(target, draft, prompts, 8, 4,
                             generator=torch.Generator().manual_seed(100 + r), on_round=rec)
        trainer.add(rec.take())
        trainer.maybe_update(len(prompts))
    after = _alpha(target, draft, prompts, 3)
    assert trainer.updates == 15 and len(trainer.buffer) > 0
    assert after > before + 0.3, (before, after)


def test_recorder_positions():
    from expertmesh.distill.speculative import Verdict

    seq = torch.zeros(2, 3, dtype=torch.int64)
    drafts = torch.ones(2, 4, dtype=torch.int64)
    p = torch.softmax(torch.randn(2, 5, 10), -1)
    v = Verdict(torch.tensor([1, 4]), torch.tensor([0, 0]), torch.ones(2))
    rec = Recorder("rejected", topk=3)
    rec(seq, drafts, p, v)
    (ex,) = rec.take()  # request 1 accepted all 4: nothing rejected to learn from
    assert ex.targets.tolist() == [4] and ex.tokens.shape == (7,) and ex.topk_p.shape == (1, 3)
    rec = Recorder("all", topk=3)
    rec(seq, drafts, p, v)
    a, b = rec.take()
    assert a.targets.tolist() == [3, 4] and b.targets.tolist() == [3, 4, 5, 6]
    rec = Recorder("onpolicy", topk=3)  # every drafted position, past the rejection too
    rec(seq, drafts, p, v)
    a, b = rec.take()
    assert a.targets.tolist() == b.targets.tolist() == [3, 4, 5, 6]
    assert torch.equal(a.topk_p, p[0, :4].topk(3, -1).values)
    with pytest.raises(ValueError, match="positions"):
        Recorder("some")


@pytest.mark.parametrize("positions,batch", [("all", 1), ("rejected", 3), ("onpolicy", 2)])
def test_merged_examples_give_the_same_loss(positions, batch):
    """Merging a request's rounds into its final sequence changes how often the draft reads the text,
    not what it learns: a causal model's logits at a position depend only on the tokens before it."""
    from expertmesh.distill.online import merge_on_path

    target, draft = _model(32, 2, 0, sharpen=6.0), _model(32, 1, 1)
    prompts = torch.randint(0, 256, (batch, 5), generator=torch.Generator().manual_seed(4))
    rec = Recorder(positions, topk=8)
    out, _ = speculative_generate(target, draft, prompts, 12, 3, generator=torch.Generator().manual_seed(5),
                                  on_round=rec)
    raw = rec.take()
    merged = merge_on_path(raw, torch.cat([prompts, out], 1))
    assert sum(len(e.targets) for e in merged) == sum(len(e.targets) for e in raw)
    if positions != "onpolicy":  # every position lies on the answer's path: one example per request
        assert len(merged) == batch < len(raw)
    else:  # drafts past a rejection stay apart; at most one merged example per request is added
        assert len(merged) <= len(raw) + batch and any(len(e.tokens) < 5 + 12 for e in merged)
    trainer = OnlineDistiller(draft, 256, "jsd")
    torch.testing.assert_close(trainer.loss(merged), trainer.loss(raw), rtol=1e-5, atol=1e-6)
