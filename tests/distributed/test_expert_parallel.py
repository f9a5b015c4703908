"""Expert parallelism equals the single-process layer: outputs and every gradient (fp32, atol 1e-5)."""

import pytest
import torch
import torch.distributed as dist

from expertmesh import config
from expertmesh.dist.comm_stats import Comm
from expertmesh.moe.layer import MoELayer
from expertmesh.parallel.expert import ExpertParallel, source_to_expert_major

pytestmark = pytest.mark.distributed
D, T, E = 16, 24, 8


def _layer(overrides):
    cfg = config.load(None, ["moe.num_experts=8", "moe.expert_dim=12", *overrides])
    torch.manual_seed(0)
    layer = MoELayer(D, cfg.moe)
    layer.init_weights(0.2, 0.2)
    return layer


def _ep_vs_single(rank, world, overrides, skew):
    full = _layer(overrides)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * T, D, generator=g)
    if skew:  # every token prefers experts 0 and 1, both on rank 0: other ranks receive nothing
        x_all = x_all.abs() + 1.0
        with torch.no_grad():
            full.router.gate.weight.zero_()
            full.router.gate.weight[:2] = 1.0
    probe = torch.randn(world * T, D, generator=g)

    # Reference: one process, every expert, each rank's tokens routed as their own batch (capacity is
    # per local batch, as in GShard/DeepSpeed; for dropless routing this equals one big batch).
    x_ref = x_all.clone().requires_grad_()
    out_ref = torch.cat([full(x_ref[r * T:(r + 1) * T].view(1, T, D))[0].reshape(T, D) for r in range(world)])
    (out_ref * probe).sum().backward()

    # Expert parallel: this rank's tokens, this rank's experts.
    ep = _layer(overrides)
    ep.load_state_dict(full.state_dict())
    placement = ExpertParallel(E, dist.group.WORLD, Comm())
    local = placement.local_slice()
    for name in ("w1", "w3", "w2"):
        setattr(ep.experts, name, torch.nn.Parameter(getattr(full.experts, name).detach()[local].clone()))
    ep.placement = placement
    mine = slice(rank * T, (rank + 1) * T)
    x = x_all[mine].clone().requires_grad_()
    out, stats = ep(x.view(1, T, D))
    (out.reshape(-1, D) * probe[mine]).sum().backward()

    torch.testing.assert_close(out.reshape(-1, D), out_ref.reshape(-1, D)[mine].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad[mine], atol=1e-5, rtol=1e-5)
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(getattr(ep.experts, name).grad, getattr(full.experts, name).grad[local],
                                   atol=1e-5, rtol=1e-5)
    dense = {n: p.grad.clone() for n, p in ep.named_parameters() if not n.startswith("experts.")}
    for n, grad in dense.items():  # dense weights see only local tokens: their sum over ranks is the full grad
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, dict(full.named_parameters())[n].grad, atol=1e-5, rtol=1e-5)
    return int(stats.tokens_per_expert_E[2:].sum())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("overrides", [[], ["moe.shared_experts=1", "moe.top_k=1"], ["moe.residual=true"],
                                       ["moe.capacity_factor=0.5"]])
def test_ep_matches_single_process(run_distributed, world, overrides):
    run_distributed(_ep_vs_single, world, overrides, False)


def test_ep_with_ranks_that_receive_nothing(run_distributed):
    routed_elsewhere = run_distributed(_ep_vs_single, 4, [], True)
    assert routed_elsewhere == [0, 0, 0, 0]


def test_source_to_expert_major_permutation():
    recv = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [source][local expert]
    # rows as received: s0e0 s0e0 s0e2 | s1e0 s1e1 s1e1 s1e1 -> want e0: s0,s0,s1  e1: s1 x3  e2: s0
    perm = source_to_expert_major(recv)
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert source_to_expert_major(torch.zeros(2, 3, dtype=torch.long)).numel() == 0
