"""The Triton MoE kernels on a GPU (moe.backend = "triton" / "triton_fused"), in bf16:

  dispatch and combine, forward + backward: bytes moved per second against `Tensor.copy_` of the routed rows
      (the bandwidth ceiling, measured in the same run); target >= 0.7 of it
  the MoE layer's experts (dispatch -> SwiGLU -> combine) forward, fused kernel and composed kernels, against a
      dense SwiGLU over the same T*K rows (the same FLOPs, cuBLAS through torch); target >= 0.6 of its speed
  host syncs of the layer's forward and backward (`torch.cuda.set_sync_debug_mode("error")`): target 0

On a CPU the kernels run in Triton's interpreter: `--quick` there only checks the script end to end (its times
measure the interpreter, not the kernels) and needs `--out`.
"""

from __future__ import annotations

import benchlib
import torch
import torch.nn.functional as F

from expertmesh.moe import ops

SHAPES = [dict(T=8192, D=2048, E=64, K=8, F=1024), dict(T=8192, D=2048, E=8, K=2, F=4096)]
QUICK = [dict(T=64, D=32, E=4, K=2, F=48)]


def routing(T, E, K, device):
    g = torch.Generator().manual_seed(0)
    return torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].contiguous().to(device)


def measure(shape: dict, device: str, reps: int, results: list, claims: list) -> None:
    """One shape's rows and claims, appended to `results` and `claims`."""
    from expertmesh.moe import triton_ops as tri

    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    T, D, E, K, Fh = (shape[k] for k in ("T", "D", "E", "K", "F"))
    case = f"T={T} D={D} E={E} K={K} F={Fh} bf16"
    N, elem = T * K, 2
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    idx = routing(T, E, K, device)
    w = torch.rand(T, K, device=device, requires_grad=True)
    w1, w3 = (torch.randn(E, D, Fh, device=device, dtype=dtype) / D**0.5 for _ in range(2))
    w2 = torch.randn(E, Fh, D, device=device, dtype=dtype) / Fh**0.5
    xs, counts, row_map, slot_of_row, offsets = ops.dispatch_triton(x.detach(), idx, E)
    y = torch.randn_like(xs).requires_grad_()
    g_rows, g_out = torch.randn_like(xs), torch.randn(T, D, device=device, dtype=dtype)
    src = torch.randn(N, D, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    dense = [torch.randn(D, Fh, device=device, dtype=dtype) for _ in range(2)] + \
        [torch.randn(Fh, D, device=device, dtype=dtype)]
    x_rows = torch.randn(N, D, device=device, dtype=dtype)

    def timed(fn):
        return lambda: (fn(), sync())

    def composed():
        from expertmesh.moe.experts import compute

        with torch.no_grad():
            return tri.combine(compute(xs, counts, w1, w3, w2, "triton"), row_map, w.detach())

    fns = {
        "copy_": timed(lambda: dst.copy_(src)),
        "dispatch": timed(lambda: ops.dispatch_triton(x, idx, E)[0].backward(g_rows)),
        "combine": timed(lambda: tri.combine(y, row_map, w).backward(g_out)),
        "fused": timed(lambda: tri.fused_moe_op(x.detach(), row_map, slot_of_row, w.detach(), w1, w3, w2, counts,
                                                offsets)),
        "composed": timed(composed),
        "dense": timed(lambda: (F.silu(x_rows @ dense[0]) * (x_rows @ dense[1])) @ dense[2]),
    }
    times = benchlib.time_alternating(fns, reps)
    s = {k: benchlib.summarize(v) for k, v in times.items()}
    copy_gbs = 2 * N * D * elem / s["copy_"]["median_s"] / 1e9
    results.append({"case": case, "impl": "torch copy_ (ceiling)", "gb_per_s": copy_gbs, **s["copy_"]})
    moved = {"dispatch": (2 * N + N + T) * D * elem, "combine": (N + T + T + N + N) * D * elem}
    for op in ("dispatch", "combine"):
        gbs = moved[op] / s[op]["median_s"] / 1e9
        results.append({"case": f"{op} fwd+bwd, {case}", "impl": "expertmesh triton", "gb_per_s": gbs,
                        "bytes": moved[op], **s[op]})
        claims.append({"metric": f"{op} fwd+bwd fraction of copy_ bandwidth, {case}", "value": gbs / copy_gbs,
                       "op": ">=", "target": 0.7})
    flops = 3 * 2 * N * D * Fh
    for impl in ("fused", "composed", "dense"):
        results.append({"case": f"experts forward, {case}", "impl": impl,
                        "tflops": flops / s[impl]["median_s"] / 1e12, **s[impl]})
    for impl in ("fused", "composed"):
        claims.append({"metric": f"{impl} experts forward speed over dense SwiGLU of the same FLOPs, {case}",
                       "value": s["dense"]["median_s"] / s[impl]["median_s"], "op": ">=", "target": 0.6})
    if device == "cuda":  # a host sync anywhere in the layer's forward and backward raises here
        syncs = 0
        torch.cuda.set_sync_debug_mode("error")
        try:
            xs2, c2, rm2, _, _ = ops.dispatch_triton(x, idx, E)
            from expertmesh.moe.experts import compute

            tri.combine(compute(xs2, c2, w1, w3, w2, "triton"), rm2, w).backward(g_out)
        except RuntimeError:
            syncs = 1  # at least one
        finally:
            torch.cuda.set_sync_debug_mode("default")
        claims.append({"metric": f"host syncs of a local MoE layer's forward + backward, {case}",
                       "value": syncs, "op": "<=", "target": 0})


def main() -> None:
    args = benchlib.parse_args(__doc__)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.quick and args.out):
        raise SystemExit("triton_moe measures GPU kernels: on a CPU run it with --quick --out PATH (a smoke test)")
    reps = 3 if args.quick else 9
    results, claims = [], []
    for shape in QUICK if args.quick else SHAPES:
        measure(shape, device, reps, results, claims)
    benchlib.write("triton_moe", {"shapes": QUICK if args.quick else SHAPES, "dtype": "bfloat16", "device": device,
                                  "reps": reps, "quick": args.quick}, results, claims, out=args.out)


if __name__ == "__main__":
    main()
