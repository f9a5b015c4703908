"""`train.compile`: the MoE layer (router, fused dispatch/combine, grouped GEMM) traces as one graph, and
compiled training computes what eager training computes: fp32 through inductor's C++ backend, and bf16
traced (aot_eager: inductor's bf16 C++ kernels round differently from eager's, which is no test)."""

import logging

import pytest
import torch
import torch._dynamo
from combinations import COMPILE_FEATURES, COMPILED
from helpers import assert_compiled, read_metrics
from torch._dynamo.utils import counters

from expertmesh import config
from expertmesh.dist.env import DistEnv
from expertmesh.moe.layer import MoELayer
from expertmesh.moe.ops import HAVE_EXTENSION
from expertmesh.train.loop import run


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
    assert_compiled(compiled, max_graphs=2)  # every block forward of every step one graph: with and without grad
    for step in range(1, 6):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-5), step
        assert compiled[step]["grad_norm"] == pytest.approx(eager[step]["grad_norm"], rel=1e-4), step
        assert compiled[step]["dropped_tokens"] == eager[step]["dropped_tokens"], step


def test_every_block_of_every_step_runs_a_compiled_graph(tmp_path, tiny_overrides, caplog):
    """Ten blocks (more than Dynamo's recompile limit of 8), dense and MoE: every block forward of every step
    is one call into a compiled graph (counted by `CompileCounts`), on the steps the collective tap samples,
    the first step after an evaluation and after a resume, with one graph per kind of block and grad mode.
    Any per-block value in the traced code (`id(self)` as the KV-cache key was one) recompiles per block
    until the limit, then runs eagerly: calls < forwards."""
    common = tiny_overrides + ["model.n_layers=10", "moe.every=2", "train.grad_accum=2", "metrics.log_every=1",
                               "train.eval_every=2", "checkpoint.every=3", "train.threads=2", *COMPILED]
    caplog.set_level(logging.WARNING, logger="torch._dynamo")
    for steps in (3, 5):  # the second run resumes from the first's step-3 checkpoint
        torch._dynamo.reset()  # a resumed run is a new process
        run(config.load(None, common + [f"train.steps={steps}"]), DistEnv(0, 0, 1, 1, "single"))
    records = read_metrics(tmp_path / "default")
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert_compiled(records, max_graphs=4)  # dense and MoE blocks, with and without grad
    # each record: 10 blocks x 2 micro-batches, and one evaluation of 2 batches (step 0's in step 1's record;
    # then every 2nd step, and each run's last)
    assert all(rec["compile"]["forwards"] == 10 * 2 + 10 * 2 for rec in records.values())
    assert not [r for r in caplog.records if "recompile" in r.getMessage().lower()]
