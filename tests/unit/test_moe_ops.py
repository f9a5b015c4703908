"""The fused dispatch/combine ops (C++ on CPU) against the pure-torch reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.moe import ops

pytestmark = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="expertmesh._C is not built")
OPS = torch.ops.expertmesh if ops.HAVE_EXTENSION else None


def routing(T, E, K, seed=0, drop=0.0, one_expert=False, int32=False):
    g = torch.Generator().manual_seed(seed)
    if one_expert:
        idx = torch.zeros(T, K, dtype=torch.int64)
        idx[:, 1:] = torch.arange(1, K)  # K distinct experts, expert 0 takes every token
    else:
        idx = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].contiguous()
    if drop:
        idx[torch.rand(T, K, generator=g) < drop] = -1
    return idx.to(torch.int32) if int32 else idx


CASES = [(T, E, K) for T in (1, 37, 4096) for E in (1, 8, 64) for K in (1, 2, 8) if K <= E]


@pytest.mark.parametrize("T, E, K", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(T, E, K, dtype):
    D = 24
    x = torch.randn(T, D).to(dtype)
    idx = routing(T, E, K, seed=T + E + K, drop=0.1, int32=(K == 2))
    w = torch.rand(T, K)  # fp32 whatever the rows' dtype
    ref = ops.dispatch_reference(x, idx, E)
    got = OPS.moe_dispatch(x, idx, E)
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g)  # a permutation: bit-exact, same order
    y = torch.randn_like(ref[0])
    # The op accumulates in fp32 and rounds once; compare with the exact (float64) sum, rounded.
    exact = ops.combine_reference(y.double(), ref[2], w.double()).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(OPS.moe_combine(y, got[2], w), exact, **tol)


@pytest.mark.parametrize("case", ["all_on_one_expert", "empty_experts", "all_dropped", "no_tokens"])
def test_edge_routings(case):
    E, K, D = 8, 2, 16
    T = 0 if case == "no_tokens" else 50
    x = torch.randn(T, D, requires_grad=True)
    if case == "all_on_one_expert":
        idx = routing(T, E, K, one_expert=True)
    elif case == "empty_experts":
        idx = torch.randint(0, 2, (T, 1)).expand(T, K).contiguous()  # only experts 0, 1 (duplicates ok)
    elif case == "all_dropped":
        idx = torch.full((T, K), -1)
    else:
        idx = torch.zeros(0, K, dtype=torch.int64)
    w = torch.rand(T, K, requires_grad=True)
    xs, counts, row_map = ops.dispatch(x, idx, E, "cpp")
    ref = ops.dispatch_reference(x.detach(), idx, E)
    assert torch.equal(counts, ref[1]) and torch.equal(row_map, ref[2]) and torch.equal(xs, ref[0])
    out = ops.combine(xs * 3, row_map, w, "cpp")
    out.sum().backward()
    expect = (3 * x.detach()[:, None, :] * (w.detach() * (idx >= 0))[..., None]).sum(1)
    torch.testing.assert_close(out, expect)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_gradcheck_float64():
    T, D, E, K = 13, 5, 4, 2
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    idx = routing(T, E, K, drop=0.2)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(T * K, D, dtype=torch.float64)

    def f(x, w):
        xs, _, row_map = ops.dispatch(x, idx, E, "cpp")
        return ops.combine(xs * scale[: xs.shape[0]], row_map, w, "cpp")

    assert torch.autograd.gradcheck(f, (x, w))


def test_gradients_match_reference():
    T, D, E, K = 300, 32, 8, 2
    idx = routing(T, E, K, drop=0.05)
    grads = {}
    for backend in ("cpp", "reference"):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w = torch.rand(T, K, generator=torch.Generator().manual_seed(2), requires_grad=True)
        xs, _, row_map = ops.dispatch(x, idx, E, backend)
        out = ops.combine(torch.tanh(xs), row_map, w, backend)
        (out * torch.arange(D)).sum().backward()
        grads[backend] = (x.grad, w.grad)
    torch.testing.assert_close(grads["cpp"], grads["reference"])


def test_opcheck():
    T, D, E, K = 20, 8, 4, 2
    x = torch.randn(T, D, requires_grad=True)
    idx = routing(T, E, K, drop=0.1)
    xs, _, row_map = OPS.moe_dispatch(x.detach(), idx, E)
    w = torch.rand(T, K, requires_grad=True)
    y = torch.randn_like(xs, requires_grad=True)
    g = torch.randn(T, D)
    # Dispatch's output length depends on the data (dropped slots), which the dynamic-shape tests
    # cannot trace; everything else runs.
    dyn = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(OPS.moe_dispatch, (x, idx, E), test_utils=dyn)
    torch.library.opcheck(OPS.moe_dispatch_backward, (xs, row_map))
    torch.library.opcheck(OPS.moe_combine, (y, row_map, w))
    torch.library.opcheck(OPS.moe_combine_backward, (g, xs, row_map, w.detach()))


@pytest.mark.parametrize("make, message", [
    (lambda: (torch.randn(4, 3), torch.tensor([[0], [4], [1], [2]]), 4), r"topk_idx\[1, 0\] = 4 is outside \[-1, 3\]"),
    (lambda: (torch.randn(4, 3), torch.tensor([[0], [-2], [1], [2]]), 4), r"topk_idx\[1, 0\] = -2 is outside"),
    (lambda: (torch.randn(4, 3), torch.zeros(4, 1), 4), "topk_idx must be int32 or int64"),
    (lambda: (torch.randint(0, 3, (4, 3)), torch.zeros(4, 1, dtype=torch.long), 4), "x must be float32"),
    (lambda: (torch.randn(5, 3), torch.zeros(4, 1, dtype=torch.long), 4), "x has 5 tokens but topk_idx has 4"),
    (lambda: (torch.randn(4, 6)[:, ::2], torch.zeros(4, 1, dtype=torch.long), 4), "x must be contiguous"),
    (lambda: (torch.randn(4, 3), torch.zeros(4, 5, dtype=torch.long), 4), r"K=5 experts per token; K must be in \[1"),
    (lambda: (torch.randn(4), torch.zeros(4, 1, dtype=torch.long), 4), "x must be 2-D"),
])
def test_dispatch_rejects_bad_input(make, message):
    with pytest.raises(RuntimeError, match=message):
        OPS.moe_dispatch(*make())


def test_combine_rejects_bad_input():
    y = torch.randn(6, 3)
    with pytest.raises(RuntimeError, match=r"row_map\[1, 0\] = 6 is outside \[-1, 5\]"):
        OPS.moe_combine(y, torch.tensor([[0, 1], [6, 2]]), torch.rand(2, 2))
    with pytest.raises(RuntimeError, match=r"weights shape \[2, 1\] != row_map shape \[2, 2\]"):
        OPS.moe_combine(y, torch.tensor([[0, 1], [3, 2]]), torch.rand(2, 1))
    with pytest.raises(RuntimeError, match="row_map must be int64"):
        OPS.moe_combine(y, torch.tensor([[0, 1], [3, 2]], dtype=torch.int32), torch.rand(2, 2))
    fp32_only = r"weights must be Float \(the accumulation type of y_sorted's "
    with pytest.raises(RuntimeError, match=fp32_only + r"Float\), got Double"):
        OPS.moe_combine(y, torch.tensor([[0, 1], [3, 2]]), torch.rand(2, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=fp32_only + r"BFloat16\)"):
        OPS.moe_combine(y.bfloat16(), torch.tensor([[0, 1], [3, 2]]), torch.rand(2, 2).bfloat16())


@settings(max_examples=150, deadline=None)
@given(T=st.integers(0, 40), D=st.integers(1, 9), E=st.integers(1, 10), K=st.integers(1, 10),
       lo=st.integers(-3, 0), hi=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_random_shapes_and_indices_never_crash(T, D, E, K, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(lo, hi + 1, (T, K), generator=g)
    x = torch.randn(T, D, generator=g)
    valid = K <= E and (T == 0 or (int(idx.min()) >= -1 and int(idx.max()) < E))
    if not valid:
        with pytest.raises(RuntimeError):
            OPS.moe_dispatch(x, idx, E)
        return
    xs, counts, row_map = OPS.moe_dispatch(x, idx, E)
    ref = ops.dispatch_reference(x, idx, E)
    assert torch.equal(xs, ref[0]) and torch.equal(counts, ref[1]) and torch.equal(row_map, ref[2])
    w = torch.rand(T, K, generator=g)
    torch.testing.assert_close(OPS.moe_combine(xs, row_map, w), ops.combine_reference(xs, row_map, w))
