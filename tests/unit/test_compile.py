"""`train.compile`: the MoE layer (router, fused dispatch/combine, grouped GEMM) traces as one graph, and
compiled training computes what eager training computes: fp32 through inductor's C++ backend, and bf16
traced (aot_eager: inductor's bf16 C++ kernels round differently from eager's, which is no test)."""

import pytest
import torch
import torch._dynamo
from combinations import COMPILE_FEATURES
from helpers import read_metrics
from torch._dynamo.utils import counters

from expertmesh import config
from expertmesh.launch.env import DistEnv
from expertmesh.launch.train import run
from expertmesh.moe.layer import MoELayer
from expertmesh.moe.ops import HAVE_EXTENSION


@pytest.mark.skipif(not HAVE_EXTENSION, reason="expertmesh._C is not built")
def test_moe_layer_traces_without_graph_breaks():
    cfg = config.load(None, ["moe.num_experts=8", "moe.top_k=2", "moe.expert_dim=32", 'moe.backend="cpp"',
                             "moe.capacity_factor=1.0", "moe.shared_experts=1"])
    torch.manual_seed(0)
    layer = MoELayer(32, cfg.moe)
    layer.init_weights(0.2, 0.2)
    x = torch.randn(2, 16, 32)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")  # the traced graph and its backward, run by eager
    xc = x.clone().requires_grad_()
    out, ref = compiled(xc)[0], layer(x.requires_grad_())[0]
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref.square().sum().backward()
    for g, p in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(xc.grad, x.grad)


# capacity dropping, bias balancing, a shared expert and PR-MoE's residual MLP inside the compiled blocks,
# over accumulated micro-batches


@pytest.mark.parametrize("precision, backend", [("fp32", "inductor"), ("bf16", "aot_eager")])
def test_compiled_training_equals_eager(tmp_path, tiny_overrides, precision, backend):
    common = tiny_overrides + COMPILE_FEATURES + ["train.steps=5", "metrics.log_every=1", "checkpoint.enabled=false",
                                          "train.eval_every=100", "train.threads=2",
                                          f'train.mixed_precision="{precision}"']
    torch._dynamo.reset()  # earlier tests compiled the same block code: start below dynamo's recompile limit
    counters.clear()
    for mode in ("eager", "compiled"):
        run(config.load(None, common + [f"train.name={mode}", f"train.compile={str(mode == 'compiled').lower()}",
                                        f'train.compile_backend="{backend}"']), DistEnv(0, 0, 1, 1, "single"))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled, one graph per block
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    for step in range(1, 6):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-5), step
        assert compiled[step]["grad_norm"] == pytest.approx(eager[step]["grad_norm"], rel=1e-4), step
        assert compiled[step]["dropped_tokens"] == eager[step]["dropped_tokens"], step
