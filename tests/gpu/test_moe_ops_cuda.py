"""The CUDA dispatch/combine kernels against the C++ CPU ops and the reference (needs a GPU)."""

import pytest
import torch

from expertmesh.moe import ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not ops.cuda_ops_available(), reason="expertmesh._C built without CUDA kernels"),
]


def _routing(T, E, K, drop, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].contiguous()
    idx[torch.rand(T, K, generator=g) < drop] = -1
    return idx


@pytest.mark.parametrize("T, E, K", [(1, 1, 1), (37, 8, 2), (4096, 64, 8), (8192, 8, 2), (4096, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(T, E, K, dtype):
    D = 96
    x = torch.randn(T, D).to(dtype)
    idx = _routing(T, E, K, 0.05, T + E)
    w = torch.rand(T, K)  # combine weights are fp32 whatever the rows' dtype (routing computes them in fp32)
    cpu = torch.ops.expertmesh.moe_dispatch(x, idx, E)
    gpu = torch.ops.expertmesh.moe_dispatch(x.cuda(), idx.cuda(), E)
    for c, g in zip(cpu, gpu, strict=True):
        assert torch.equal(c, g.cpu())  # same stable order as the CPU kernel
    y = torch.randn_like(cpu[0])
    torch.testing.assert_close(torch.ops.expertmesh.moe_combine(y.cuda(), gpu[2], w.cuda()).cpu(),
                               torch.ops.expertmesh.moe_combine(y, cpu[2], w), atol=1e-2, rtol=1e-2)


def test_cuda_gradients_match_reference():
    T, D, E, K = 1000, 64, 16, 4
    idx = _routing(T, E, K, 0.05, 0).cuda()
    grads = {}
    for backend in ("cuda", "reference"):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).cuda().requires_grad_()
        w = torch.rand(T, K, generator=torch.Generator().manual_seed(2)).cuda().requires_grad_()
        xs, _, row_map = ops.dispatch(x, idx, E, backend)
        (ops.combine(torch.tanh(xs), row_map, w, backend) * torch.arange(D, device="cuda")).sum().backward()
        grads[backend] = (x.grad, w.grad)
    torch.testing.assert_close(grads["cuda"], grads["reference"])


def test_cuda_opcheck_and_errors():
    T, D, E, K = 64, 32, 8, 2
    x = torch.randn(T, D, device="cuda", requires_grad=True)
    idx = _routing(T, E, K, 0.1, 3).cuda()
    torch.library.opcheck(torch.ops.expertmesh.moe_dispatch, (x, idx, E),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    xs, _, row_map = torch.ops.expertmesh.moe_dispatch(x.detach(), idx, E)
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.expertmesh.moe_combine, (xs.clone().requires_grad_(), row_map, w))
    bad = idx.clone()
    bad[5, 1] = E
    with pytest.raises(RuntimeError, match=rf"topk_idx\[5, 1\] = {E} is outside"):
        torch.ops.expertmesh.moe_dispatch(x.detach(), bad, E)
    with pytest.raises(RuntimeError, match="weights must be Float"):
        torch.ops.expertmesh.moe_combine(xs.bfloat16(), row_map, w.detach().bfloat16())


def test_cuda_combine_and_its_backward_never_wait_for_the_device():
    """No host sync in combine or its backward (a bounds flag read back with .item() was 2 per MoE layer)."""
    T, D, E, K = 256, 64, 8, 2
    x = torch.randn(T, D, device="cuda")
    idx = _routing(T, E, K, 0.1, 4).cuda()
    xs, _, row_map = torch.ops.expertmesh.moe_dispatch(x, idx, E)
    y = xs.clone().requires_grad_()
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.expertmesh.moe_combine(y, row_map, w)
        torch.autograd.grad(out, (y, w), torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_row_map_out_of_range_is_caught_in_debug_mode():
    import subprocess
    import sys

    code = ("import torch, expertmesh.moe.ops\n"
            "y = torch.randn(4, 8, device='cuda'); w = torch.rand(4, 1, device='cuda')\n"
            "rm = torch.tensor([[0], [1], [2], [9]], device='cuda')\n"
            "torch.ops.expertmesh.moe_combine(y, rm, w)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "EXPERTMESH_MOE_CHECKS": "1"})
    assert r.returncode != 0 and "row_map has entries outside [-1, 3]" in r.stderr, r.stderr[-2000:]
