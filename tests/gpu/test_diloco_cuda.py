"""The DiLoCo exchange on a GPU runs on a stream of its own (needs a GPU): with overlap, the outer steps of a
worker on CUDA equal the same worker's on CPU, the training stream waiting for the exchange's event only where
the result is applied. (The overlap itself needs two GPUs: NCCL puts no two ranks on one device.)"""

import pytest
import torch

from expertmesh import config
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.diloco import DiLoCo
from expertmesh.models.transformer import Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _run(device):
    cfg = config.load(None, ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
                             "moe.num_experts=8", "moe.expert_dim=64", "diloco.enabled=true", "diloco.sync_every=4",
                             "diloco.fragments=2", "diloco.overlap=1"])
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(device)
    d = DiLoCo(model, cfg.model.n_layers, cfg.diloco, None, Comm())
    g = torch.Generator().manual_seed(1)
    for step in range(1, 13):
        with torch.no_grad():  # an inner step's change, the same on both devices
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(device), alpha=1e-3)
        assert d.after_step(step) == step
        if device == "cuda":
            assert all(p.thread is None or p.done is not None for p in d.pending)
    d.finish()
    return [g.cpu() for g in d.global_copy], {k: v.cpu() for k, v in model.state_dict().items()}


def test_exchange_on_its_own_stream_gives_the_cpu_outer_steps():
    cpu, cuda = _run("cpu"), _run("cuda")
    for a, b in zip(cpu[0], cuda[0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for key in cpu[1]:
        torch.testing.assert_close(cuda[1][key], cpu[1][key], rtol=1e-5, atol=1e-6, msg=key)
