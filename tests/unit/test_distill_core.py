"""Speculative decoding's acceptance rule is lossless; the distillation divergences are the textbook ones."""

import math

import pytest
import torch
from helpers import chi2_pvalue

from expertmesh.distill.losses import densify, divergence
from expertmesh.distill.speculative import verify


def _emitted_first_tokens(p, q, draws, seed):
    """Draft x ~ q, verify with gamma = 1: the first emitted token is x if accepted, else the residual draw."""
    g = torch.Generator().manual_seed(seed)
    x = torch.multinomial(q.expand(draws, -1), 1, replacement=True, generator=g)
    P = torch.stack([p, p]).expand(draws, 2, -1)  # position 0 and the bonus position
    v = verify(P, q.expand(draws, 1, -1), x, generator=g)
    return torch.where(v.accepted_B > 0, x[:, 0], v.next_token_B)


def test_sampling_is_lossless_chi_squared():
    g = torch.Generator().manual_seed(0)
    V = 256
    p = torch.softmax(torch.randn(V, generator=g) * 2, 0).double()
    q = torch.softmax(torch.randn(V, generator=g) * 2, 0).double()  # a poor draft: many rejections
    tokens = _emitted_first_tokens(p, q, 100_000, 1)
    counts = torch.bincount(tokens, minlength=V)
    assert chi2_pvalue(counts, p) > 0.01
    # and the draft's own distribution is rejected by the same test (the test has power)
    assert chi2_pvalue(counts, q) < 1e-6
    # the empirical distribution approaches p as draws grow
    tvd = [0.5 * (torch.bincount(_emitted_first_tokens(p, q, n, 2), minlength=V) / n - p).abs().sum()
           for n in (1_000, 10_000, 100_000)]
    assert tvd[0] > tvd[1] > tvd[2]


def test_acceptance_rate_is_one_minus_tvd():
    g = torch.Generator().manual_seed(3)
    V, draws = 16, 200_000
    p = torch.softmax(torch.randn(V, generator=g), 0).double()
    q = torch.softmax(torch.randn(V, generator=g), 0).double()
    x = torch.multinomial(q.expand(draws, -1), 1, replacement=True, generator=g)
    v = verify(torch.stack([p, p]).expand(draws, 2, -1), q.expand(draws, 1, -1), x, generator=g)
    expected = 1 - 0.5 * (p - q).abs().sum()
    assert float(v.alpha_B[0]) == pytest.approx(float(expected), abs=1e-6)  # p, q sum to 1 +- 1e-7
    assert float(v.accepted_B.double().mean()) == pytest.approx(float(expected), abs=0.005)


def test_greedy_keeps_the_argmax_prefix():
    V = 5
    p = torch.full((1, 4, V), 0.1)
    for i, best in enumerate([2, 4, 1, 3]):
        p[0, i, best] = 0.6
    q = torch.full((1, 3, V), 0.2)
    v = verify(p, q, torch.tensor([[2, 4, 0]]), greedy=True)
    assert v.accepted_B.tolist() == [2] and v.next_token_B.tolist() == [1]  # target's argmax at position 2
    v = verify(p, q, torch.tensor([[2, 4, 1]]), greedy=True)
    assert v.accepted_B.tolist() == [3] and v.next_token_B.tolist() == [3]  # all kept: bonus argmax


def test_verify_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, G\+1, V\]"):
        verify(torch.rand(2, 3, 8), torch.rand(2, 3, 8), torch.zeros(2, 3, dtype=torch.long))


def test_divergences_match_hand_computed_values():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    logits = q.log()
    ln2 = math.log(2)
    fkl = 0.5 * ln2 + 0.25 * math.log(0.5)  # sum p log(p/q)
    rkl = 0.25 * math.log(0.5) + 0.5 * ln2
    tvd = 0.25
    # m = (p + q) / 2 = [0.375, 0.25, 0.375]; the middle token contributes nothing
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375)) \
        + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.5 * math.log(0.5 / 0.375))
    assert float(divergence("fkl", logits, p)) == pytest.approx(fkl, abs=1e-6)
    assert float(divergence("rkl", logits, p)) == pytest.approx(rkl, abs=1e-6)
    assert float(divergence("tvd", logits, p)) == pytest.approx(tvd, abs=1e-6)
    assert float(divergence("jsd", logits, p, beta=0.5)) == pytest.approx(jsd, abs=1e-6)
    for kind in ("fkl", "rkl", "jsd", "tvd"):  # zero at q = p
        assert float(divergence(kind, p.log(), p)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one of"):
        divergence("kl", logits, p)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_loss_falls_on_a_fixed_batch(kind):
    g = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(32, 50, generator=g) * 3, -1)
    logits = torch.zeros(32, 50, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    first = float(divergence(kind, logits, target).detach())
    for _ in range(100):
        opt.zero_grad()
        divergence(kind, logits, target).backward()
        opt.step()
    assert float(divergence(kind, logits, target).detach()) < 0.3 * first


def test_densify_keeps_top_k_and_a_distribution():
    p = densify(torch.tensor([[3, 0]]), torch.tensor([[0.6, 0.3]]), vocab=5)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0, 3] == pytest.approx(0.6) and p[0, 0] == pytest.approx(0.3)
    assert p[0, 1] == pytest.approx(0.1 / 3)
