"""Fused dispatch/combine, forward + backward: achieved memory bandwidth and speedup over the reference.

For each shape and op, times forward+backward of the fused op (C++ on CPU, CUDA on GPU) and of the
pure-torch reference, alternating them, and `Tensor.copy_` of a routed-rows-sized tensor: the
memory-bandwidth ceiling of this machine with the same threads. Bytes are the rows each op must
read and write (N = T*K routed rows, each D wide):
  dispatch fwd  read N rows, write N rows      dispatch bwd  read N rows, write T rows
  combine  fwd  read N rows, write T rows      combine  bwd  read T + N rows, write N rows
"""

from __future__ import annotations

import benchlib
import torch

from expertmesh.moe import ops

SHAPES = [dict(T=8192, D=1024, E=64, K=8), dict(T=8192, D=1024, E=8, K=2)]
QUICK = [dict(T=1024, D=256, E=64, K=8), dict(T=1024, D=256, E=8, K=2)]


def routing(T, E, K, device):
    g = torch.Generator().manual_seed(0)
    return torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].contiguous().to(device)


def make_cases(T, D, E, K, device, backend):
    x = torch.randn(T, D, device=device, requires_grad=True)
    idx = routing(T, E, K, device)
    w = torch.rand(T, K, device=device, requires_grad=True)
    xs, _, row_map = ops.dispatch(x.detach(), idx, E, "reference")
    y = torch.randn_like(xs).requires_grad_()
    g_sorted, g_out = torch.randn_like(xs), torch.randn(T, D, device=device)

    def dispatch_step():
        out, _, _ = ops.dispatch(x, idx, E, backend)
        out.backward(g_sorted)

    def combine_step():
        ops.combine(y, row_map, w, backend).backward(g_out)

    return {"dispatch": dispatch_step, "combine": combine_step}


def main() -> None:
    args = benchlib.parse_args(__doc__)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = "cuda" if device == "cuda" else "cpp"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reps = 5 if args.quick else 9
    results, claims = [], []
    for shape in QUICK if args.quick else SHAPES:
        T, D, E, K = shape["T"], shape["D"], shape["E"], shape["K"]
        N, elem = T * K, 4
        case = f"T={T} D={D} E={E} K={K} fp32"
        src = torch.randn(N, D, device=device)
        dst = torch.empty_like(src)
        fused_cases = make_cases(T, D, E, K, device, fused)
        ref_cases = make_cases(T, D, E, K, device, "reference")
        moved = {"dispatch": (2 * N + N + T) * D * elem, "combine": (N + T + T + N + N) * D * elem}

        def timed(fn):
            return lambda: (fn(), sync())

        fns = {"copy_": timed(lambda dst=dst, src=src: dst.copy_(src)),
               "copy_cold": timed(lambda src=src: torch.empty_like(src).copy_(src))}
        for op in ("dispatch", "combine"):
            fns[f"{op}:{fused}"] = timed(fused_cases[op])
            fns[f"{op}:reference"] = timed(ref_cases[op])
        times = benchlib.time_alternating(fns, reps)
        copy_s = benchlib.summarize(times["copy_"])["median_s"]
        copy_gbs = 2 * N * D * elem / copy_s / 1e9
        results.append({"case": case, "impl": "torch copy_ (ceiling)", "gb_per_s": copy_gbs,
                        **benchlib.summarize(times["copy_"])})
        cold = benchlib.summarize(times["copy_cold"])
        results.append({"case": case, "impl": "torch empty_like + copy_ (fresh output, as any op allocates)",
                        "gb_per_s": 2 * N * D * elem / cold["median_s"] / 1e9, **cold})
        for op in ("dispatch", "combine"):
            f, r = benchlib.summarize(times[f"{op}:{fused}"]), benchlib.summarize(times[f"{op}:reference"])
            gbs = moved[op] / f["median_s"] / 1e9
            results.append({"case": f"{op} fwd+bwd, {case}", "impl": f"expertmesh {fused}", "gb_per_s": gbs,
                            "bytes": moved[op], **f})
            results.append({"case": f"{op} fwd+bwd, {case}", "impl": "torch reference",
                            "gb_per_s": moved[op] / r["median_s"] / 1e9, **r})
            claims.append({"metric": f"{op} fwd+bwd fraction of copy_ bandwidth, {case}",
                           "value": gbs / copy_gbs, "op": ">=", "target": 0.60})
            claims.append({"metric": f"{op} fwd+bwd speedup vs torch reference, {case}",
                           "value": r["median_s"] / f["median_s"], "op": ">=", "target": 2.0})
    benchlib.write("moe_ops", {"shapes": QUICK if args.quick else SHAPES, "dtype": "float32", "device": device,
                               "reps": reps, "quick": args.quick}, results, claims, out=args.out)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
