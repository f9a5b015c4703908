"""The Triton kernels (expertmesh/moe/triton_ops.py), run on CPU tensors by Triton's interpreter: dispatch, combine,
their backwards, the grouped expert GEMMs and the fused MoE forward, against the C++ ops and a float64 per-token
loop, on shapes at the edges (an expert with no rows and one with one row, rows not a multiple of a block,
K = 1 and K = 8, dropped slots, D not a power of two), in fp32 and bf16; `torch.library.opcheck` on every op.

Tolerances: fp32 against the float64 loop, what fp32 rounding of sums of <= 64 products gives (relative 2e-6
measured here at most; allowed 2e-5); bf16 against the loop run on the bf16-rounded inputs, one bf16 rounding of
the output plus the inputs' rounding inside (relative 8e-3 allowed, 2^-7 = one bf16 ulp).

On a GPU (tests/gpu/device_check.sh) the same tests run the compiled kernels on CUDA tensors (`DEV`), the C++
ops and the loop staying on the CPU."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from expertmesh.moe import ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    """The GPU's launch tiles, also under the interpreter: these shapes then cross tile edges as the GPU does."""
    monkeypatch.setattr(tri, "TILES", tri.GPU_TILES)
if importlib.util.find_spec("triton") is not None:
    from expertmesh.moe import triton_ops as tri

# name -> (T, K, E, D, F): 37 slots (not a block's multiple), K = 1, K = 8, D = 20 and 33
SHAPES = {"T13-K2-E6-D20": (13, 2, 6, 20, 24), "T37-K1-E4-D33": (37, 1, 4, 33, 40),
          "T6-K8-E12-D16": (6, 8, 12, 16, 20)}


def routing(T, K, E, seed=0):
    """Top-k ids with expert E-1 never chosen (no rows), expert 0 chosen once (one row) and a few slots dropped
    (-1), as a capacity limit leaves them; distinct experts per token, as a router's top-k gives."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E - 2, generator=g)[:K] + 1 for _ in range(T)]) if K <= E - 2 else None
    idx[0, 0] = 0
    drop = torch.rand(T, K, generator=g) < 0.15
    drop[0, 0] = False
    return torch.where(drop, torch.full_like(idx, -1), idx)


def inputs(shape, dtype=torch.float32, seed=0):
    T, K, E, D, Fh = shape
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, D, generator=g)
    w = torch.rand(T, K, generator=g)
    w1, w3 = (torch.randn(E, D, Fh, generator=g) / D**0.5 for _ in range(2))
    w2 = torch.randn(E, Fh, D, generator=g) / Fh**0.5
    return routing(T, K, E, seed), *(t.to(dtype) for t in (x, w1, w3, w2)), w


def loop_moe(idx, x, w, w1, w3, w2):
    """The layer token by token in float64: sum over kept slots of w * SwiGLU_e(x_t)."""
    x, w, w1, w3, w2 = (t.double() for t in (x, w, w1, w3, w2))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e >= 0:
                out[t] += w[t, k] * ((F.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e])
    return out


def close(got, want, dtype):
    tol = 2e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatch_and_combine_equal_the_cpp_ops_and_their_gradients(shape, dtype):
    """Dispatch: the first N rows, the counts and the row map equal the C++ op's exactly, the rest zero; its
    backward sums each token's rows. Combine equals the C++ op (fp32 products and sums in k order, one rounding)
    and the float64 loop, and so do the gradients of both inputs."""
    T, K, E, D, _ = shape
    idx, x, *_, w = inputs(shape, dtype)
    xs, counts, row_map, slot_of_row, offsets = (t.cpu() for t in ops.dispatch_triton(x.to(DEV), idx.to(DEV), E))
    ref_xs, ref_counts, ref_map = ops.dispatch(x, idx, E, "cpp")
    n = ref_xs.shape[0]
    assert torch.equal(xs[:n], ref_xs) and not xs[n:].any()
    assert torch.equal(counts, ref_counts) and torch.equal(row_map, ref_map)
    assert counts[0] == 1 and counts[-1] == 0 and (idx < 0).any()
    assert torch.equal(offsets, (torch.cumsum(ref_counts, 0) - ref_counts).int())
    kept = row_map >= 0
    assert torch.equal(slot_of_row[:n].long().sort().values, torch.arange(T * K)[kept.flatten()])

    y = torch.randn(xs.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y[n:] = 0
    for impl in ("triton", "cpp"):
        dev = DEV if impl == "triton" else torch.device("cpu")
        yy = (y if impl == "triton" else y[:n]).to(dev, copy=True).requires_grad_(True)
        ww = w.to(dev, copy=True).requires_grad_(True)
        out = ops.combine(yy, row_map.to(dev), ww, impl)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        out.backward(grad.to(dev))
        if impl == "triton":
            got = (out.detach().cpu(), yy.grad[:n].cpu(), ww.grad.cpu())
            assert not yy.grad[n:].any()  # rows no slot reads get no gradient
        else:
            want = (out.detach(), yy.grad, ww.grad)
    for a, b in zip(got, want, strict=True):
        close(a, b, dtype)
    if dtype == torch.float32:  # and against float64
        y64, w64 = y[:n].double().requires_grad_(True), w.double().requires_grad_(True)
        out64 = ops.combine_reference(y64, row_map, w64)
        out64.backward(grad.double())
        for a, b in zip(got, (out64.detach(), y64.grad, w64.grad), strict=True):
            close(a, b, dtype)

    xg = x.to(DEV, copy=True).requires_grad_(True)
    xs2 = ops.dispatch_triton(xg, idx.to(DEV), E)[0]
    g_rows = torch.randn(xs2.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    xs2.backward(g_rows.to(DEV))
    want = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            if row_map[t, k] >= 0:
                want[t] += g_rows[row_map[t, k]].double()
    close(xg.grad.cpu(), want, dtype)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_composed_and_the_fused_layer_equal_the_loop_with_every_gradient(shape, dtype):
    """dispatch -> grouped SwiGLU (Triton GEMMs) -> combine, and the fused kernel, against the float64 loop: the
    output and the gradients of x, the routing weights and w1, w3, w2."""
    T, K, E, D, _ = shape
    idx, x, w1, w3, w2, w = inputs(shape, dtype)

    def composed(x, w, w1, w3, w2):
        xs, counts, row_map, _, _ = ops.dispatch_triton(x, idx.to(DEV), E)
        from expertmesh.moe.experts import compute

        return ops.combine(compute(xs, counts, w1, w3, w2, "triton"), row_map, w, "triton")

    def fused(x, w, w1, w3, w2):
        _, counts, row_map, slot_of_row, offsets = ops.dispatch_triton(x.detach(), idx.to(DEV), E)
        return tri.fused_moe_op(x, row_map, slot_of_row, w, w1, w3, w2, counts, offsets)

    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, w1, w3, w2)]
    want = loop_moe(idx, *leaves)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(6))
    want.backward(grad.double())
    for fn in (composed, fused):
        args = [t.detach().to(DEV).requires_grad_(True) for t in (x, w, w1, w3, w2)]
        out = fn(*args)
        out.backward(grad.to(out.dtype).to(DEV))
        close(out.detach().cpu(), want.detach(), dtype)
        for name, a, b in zip(("x", "w", "w1", "w3", "w2"), args, leaves, strict=True):
            assert a.grad is not None, (fn.__name__, name)
            close(a.grad.cpu(), b.grad, dtype)


def test_the_cpu_backends_and_triton_train_a_layer_alike():
    """A whole MoE model (2 MoE layers, top-2 of 8) forward and backward with moe.backend = triton and
    triton_fused equals the C++ backend: logits and every parameter's gradient (fp32 rounding: 2e-5)."""
    from expertmesh import config
    from expertmesh.models.transformer import Transformer

    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for backend in ("cpp", "triton", "triton_fused"):
        cfg = config.load(None, ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "moe.num_experts=8",
                                 "moe.top_k=2", "moe.expert_dim=24", "moe.every=1", f'moe.backend="{backend}"'])
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.init_weights()
        dev = torch.device("cpu") if backend == "cpp" else DEV
        model.to(dev)
        logits, _ = model(x.to(dev))
        logits.float().logsumexp(-1).mean().backward()
        out[backend] = [logits.detach().cpu(), *(p.grad.cpu() for p in model.parameters())]
    for backend in ("triton", "triton_fused"):
        for a, b in zip(out[backend], out["cpp"], strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item())


def test_opcheck_every_op():
    """Schemas, fake tensors (static shapes: no data-dependent sizes), autograd registration and AOT dispatch."""
    shape = SHAPES["T13-K2-E6-D20"]
    T, K, E, D, _ = shape
    idx, x, w1, w3, w2, w = (t.to(DEV) for t in inputs(shape))
    xs, counts, row_map, slot_of_row, offsets = ops.dispatch_triton(x, idx, E)
    h = torch.randn(xs.shape[0], w1.shape[-1], device=DEV)
    def grad(t):
        return t.detach().clone().requires_grad_(True)

    cases = [  # the ops that run only inside a backward take inputs without gradients
        (tri.dispatch, (grad(x), idx, E)),
        (tri.gather_sum_op, (xs, row_map)),
        (tri.gather_rows_op, (x, slot_of_row, K)),
        (tri.combine, (grad(xs), row_map, grad(w))),
        (tri.combine_backward_op, (torch.randn(T, D, device=DEV), xs, row_map, w)),
        (tri.gmm_op, (grad(xs), grad(w1), counts, offsets)),
        (tri.gmm_wgrad_op, (xs, h, counts, offsets)),
        (tri.fused_moe_op, (grad(x), row_map, slot_of_row, grad(w), grad(w1), grad(w3), grad(w2), counts, offsets)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
