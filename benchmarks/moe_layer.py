"""One MoE layer, forward + backward tokens/s: expertmesh vs DeepSpeed-MoE vs the same FLOPs dense.

One process, 2 threads. The dense anchor is a SwiGLU MLP with hidden K*F: the expert FLOPs a
token costs in the MoE layer, with no routing at all. DeepSpeed runs `deepspeed.moe.layer.MoE`
with drop_tokens=False and a deterministic second expert (top2_2nd_expert_sampling=False), its
experts the same SwiGLU. Implementations alternate within each repetition.
"""

from __future__ import annotations

import os

import benchlib
import torch
import torch.distributed as dist

from expertmesh import config
from expertmesh.models.mlp import SwiGLU
from expertmesh.moe.layer import MoELayer

SHAPES = {"fine": dict(T=4096, D=256, F=128, E=64, K=8), "coarse": dict(T=4096, D=256, F=1024, E=8, K=2)}
QUICK = {"fine": dict(T=512, D=256, F=128, E=64, K=8), "coarse": dict(T=512, D=256, F=1024, E=8, K=2)}


def build(shape: dict) -> dict:
    T, D, Fh, E, K = (shape[k] for k in ("T", "D", "F", "E", "K"))
    cfg = config.load(None, [f"moe.num_experts={E}", f"moe.top_k={K}", f"moe.expert_dim={Fh}"])
    torch.manual_seed(0)
    ours = MoELayer(D, cfg.moe)
    ours.init_weights(0.02, 0.02)
    impls = {"expertmesh": lambda x: ours(x)[0]}
    try:
        from deepspeed.moe.layer import MoE

        ds = MoE(hidden_size=D, expert=SwiGLU(D, Fh), num_experts=E, ep_size=1, k=K, drop_tokens=False,
                 use_rts=False, top2_2nd_expert_sampling=False)
        impls["deepspeed"] = lambda x: ds(x)[0]
    except ImportError:
        print("deepspeed is not installed: its rows are left out")
    dense = SwiGLU(D, K * Fh)
    impls["dense same FLOPs"] = dense
    return impls


def main() -> None:
    args = benchlib.parse_args(__doc__)
    torch.set_num_threads(2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(benchlib_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)  # DeepSpeed's MoE asks for its groups
    shapes = QUICK if args.quick else SHAPES
    reps = 5 if args.quick else 7
    results, claims = [], []
    for name, shape in shapes.items():
        T, D = shape["T"], shape["D"]
        impls = build(shape)
        x = torch.randn(1, T, D, requires_grad=True)
        grad = torch.randn(1, T, D)

        def step(fn, x=x, grad=grad):
            return lambda: fn(x).backward(grad)

        times = benchlib.time_alternating({k: step(f) for k, f in impls.items()}, reps)
        case = f"{name} T={T} D={D} F={shape['F']} E={shape['E']} K={shape['K']} fp32"
        rows = {impl: {"case": case, "impl": impl, "tokens_per_s": T / benchlib.summarize(ts)["median_s"],
                       **benchlib.summarize(ts)} for impl, ts in times.items()}
        med = {impl: row["median_s"] for impl, row in rows.items()}
        rows["expertmesh"]["fraction_of_dense"] = med["dense same FLOPs"] / med["expertmesh"]
        if "deepspeed" in med:
            rows["expertmesh"]["speedup_vs_deepspeed"] = med["deepspeed"] / med["expertmesh"]
        results.extend(rows.values())
        if "deepspeed" in med and name == "fine":  # the issue's target is on the fine-grained shape
            claims.append({"metric": f"speedup vs deepspeed, {case}", "value": med["deepspeed"] / med["expertmesh"],
                           "op": ">=", "target": 1.5})
        claims.append({"metric": f"fraction of dense same-FLOPs throughput, {case}",
                       "value": med["dense same FLOPs"] / med["expertmesh"], "op": ">=", "target": 0.85})
    dist.destroy_process_group()
    benchlib.write("moe_layer", {"shapes": shapes, "threads": 2, "dtype": "float32", "reps": reps,
                                 "quick": args.quick}, results, claims, out=args.out, threads=2)


def benchlib_port() -> int:
    from expertmesh.testing import free_port

    return free_port()


if __name__ == "__main__":
    main()
