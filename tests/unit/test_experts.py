import pytest
import torch

from expertmesh.moe.experts import GroupedExperts


@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 0, 7], [0, 0, 0, 0], [3, 3, 3, 3]])
def test_grouped_gemm_matches_the_per_expert_loop(counts):
    torch.manual_seed(0)
    ex = GroupedExperts(4, 12, 20)
    ex.init_weights(0.3, 0.3)
    t = torch.tensor(counts)
    x = torch.randn(int(t.sum()), 12, requires_grad=True)
    grads = []
    for fn in (ex.forward, ex.forward_loop):
        ex.zero_grad()
        x.grad = None
        y = fn(x, t)
        (y * torch.linspace(-1, 1, 12)).sum().backward()
        grads.append((y.detach(), x.grad.clone() if x.grad is not None else None,
                      [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ex.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = grads
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    if t.sum():
        torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-5)
    for a, b in zip(gp1, gp2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_float64_uses_the_loop_and_gradchecks():
    torch.manual_seed(0)
    ex = GroupedExperts(3, 4, 5).double()
    ex.init_weights(0.5, 0.5)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ex(x, torch.tensor([2, 0, 4])), (x,))
