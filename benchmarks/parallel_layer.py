"""A MoE layer under expert parallelism (ep=4), forward + backward: expertmesh vs DeepSpeed-MoE vs
Megatron-Core, on 4 gloo ranks with 1 thread each, in the same processes, alternating.

Every implementation gets the same shapes: T tokens per rank, model dim D, SwiGLU experts of hidden
F, E experts, top-K, dropless. DeepSpeed runs `deepspeed.moe.layer.MoE(ep_size=4,
drop_tokens=False)`; Megatron-Core runs `MoELayer` with the alltoall token dispatcher and its
SequentialMLP experts (its grouped GEMMs need Transformer Engine or the grouped_gemm CUDA package).
Megatron-Core is written for CUDA; `_patch_megatron_for_cpu` below gives it no-op CUDA streams and
events, a "cpu" current device, the missing Transformer Engine symbol, and split sizes as lists
for gloo's all_to_all. Nothing else of it is changed.

A step is timed from a barrier to a barrier, so it is the slowest rank's time: tokens/s counts all
4 ranks' tokens. Bytes are what rank 0 sends in one step, counted by expertmesh's collective
wrapper (its own all-to-alls) and by the collective tap (every c10d op the others issue); the sum
over ranks is reported too.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import benchlib
import torch
import torch.distributed as dist

SHAPE = dict(T=4096, D=256, F=1024, E=8, K=2)
QUICK = dict(T=256, D=256, F=1024, E=8, K=2)
WORLD = 4


def _patch_megatron_for_cpu() -> None:
    class _Event:
        def synchronize(self):
            pass

        def wait(self, *_a, **_k):
            pass

        def query(self):
            return True

    class _Stream:
        def wait_stream(self, _other):
            pass

        def wait_event(self, _event):
            pass

        def record_event(self, _event=None):
            return _Event()

        def synchronize(self):
            pass

    stream = _Stream()
    torch.cuda.Stream = lambda *a, **k: stream
    torch.cuda.current_stream = lambda *a, **k: stream
    torch.cuda.stream = lambda _s: contextlib.nullcontext()
    torch.cuda.Event = lambda *a, **k: _Event()
    torch.cuda.current_device = lambda: "cpu"
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # only defined when Transformer Engine imports
        moe_utils.te_general_gemm = None
    a2a = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,  # noqa: A002
                          async_op=False):
        as_list = (lambda s: s.tolist() if isinstance(s, torch.Tensor) else s)
        return a2a(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group=group,
                   async_op=async_op)

    mappings.torch.distributed.all_to_all_single = all_to_all_single  # (this is torch.distributed itself)


def build_expertmesh(shape, comm):
    from expertmesh import config
    from expertmesh.moe.layer import MoELayer
    from expertmesh.parallel.fssdp import ExpertPlacement

    T, D, Fh, E, K = (shape[k] for k in ("T", "D", "F", "E", "K"))
    cfg = config.load(None, [f"moe.num_experts={E}", f"moe.top_k={K}", f"moe.expert_dim={Fh}"])
    torch.manual_seed(0)
    layer = MoELayer(D, cfg.moe)
    layer.init_weights(0.02, 0.02)
    layer.dispatcher = ExpertPlacement(E, dist.group.WORLD, comm)
    rows = layer.dispatcher.local_slice()
    for name in ("w1", "w3", "w2"):
        setattr(layer.experts, name, torch.nn.Parameter(getattr(layer.experts, name).detach()[rows].clone()))
    x = torch.randn(1, T, D, requires_grad=True)
    return lambda: layer(x)[0].backward(torch.ones_like(x))


def build_deepspeed(shape):
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # wraps the existing group
    from expertmesh.layers.mlp import SwiGLU

    T, D, Fh, E, K = (shape[k] for k in ("T", "D", "F", "E", "K"))
    torch.manual_seed(0)
    layer = MoE(hidden_size=D, expert=SwiGLU(D, Fh), num_experts=E, ep_size=WORLD, k=K, drop_tokens=False,
                use_rts=False, top2_2nd_expert_sampling=False)
    x = torch.randn(1, T, D, requires_grad=True)
    return lambda: layer(x)[0].backward(torch.ones_like(x))


def build_megatron(shape):
    _patch_megatron_for_cpu()
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    T, D, Fh, E, K = (shape[k] for k in ("T", "D", "F", "E", "K"))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=WORLD)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=D, num_attention_heads=4, ffn_hidden_size=Fh, moe_ffn_hidden_size=Fh,
        num_moe_experts=E, moe_router_topk=K, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
        use_cpu_initialization=True, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, bf16=False, params_dtype=torch.float32, expert_model_parallel_size=WORLD,
        moe_aux_loss_coeff=0.01)
    torch.manual_seed(0)
    layer = MoELayer(cfg, get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False).submodules)
    x = torch.randn(T, 1, D, requires_grad=True)  # Megatron's layout: [sequence, batch, hidden]
    return lambda: layer(x)[0].backward(torch.ones_like(x))


def rank_main(rank: int, world: int, shape: dict, reps: int) -> dict:
    from expertmesh.dist.comm_stats import CollectiveTap, Comm

    torch.set_num_threads(1)
    comm = Comm()
    impls = {"expertmesh": build_expertmesh(shape, comm)}
    for name, build in (("deepspeed", build_deepspeed), ("megatron-core", build_megatron)):
        try:
            impls[name] = build(shape)
        except ImportError as e:
            if rank == 0:
                print(f"{name} is not installed ({e}): its rows are left out")
    tap = CollectiveTap(comm, {})
    sent = {}
    for name, step in impls.items():  # warm-up, and one step with every byte counted
        step()
        comm.take()
        tap.take_per_step()
        with tap:
            step()
        tap.steps = 1
        sent[name] = sum(comm.take().values()) + sum(tap.take_per_step().values())
    times = {name: [] for name in impls}
    for _ in range(reps):
        for name, step in impls.items():
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    total = torch.tensor([sent[name] for name in impls], dtype=torch.float64)
    dist.all_reduce(total)
    return {"times": times, "sent_rank0": sent, "sent_all": dict(zip(impls, total.tolist(), strict=True))}


def main() -> None:
    args = benchlib.parse_args(__doc__)
    from expertmesh.testing import spawn

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    shape = QUICK if args.quick else SHAPE
    reps = 5 if args.quick else 7
    out = spawn(rank_main, WORLD, args=(shape, reps), timeout=1800)[0]
    T = shape["T"]
    case = f"ep={WORLD} T={T}/rank D={shape['D']} F={shape['F']} E={shape['E']} K={shape['K']} fp32 dropless"
    results = []
    med = {}
    for impl, ts in out["times"].items():
        s = benchlib.summarize(ts)
        med[impl] = s["median_s"]
        results.append({"case": case, "impl": impl, "tokens_per_s": WORLD * T / s["median_s"], **s,
                        "bytes_sent_per_step_rank0": out["sent_rank0"][impl],
                        "bytes_sent_per_step_all_ranks": out["sent_all"][impl]})
    claims = []
    ours = out["sent_all"]["expertmesh"]
    for other, target in (("deepspeed", 1.3), ("megatron-core", None)):
        if other not in med:
            continue
        if target is not None:
            claims.append({"metric": f"speedup vs {other} (tokens/s), {case}", "value": med[other] / med["expertmesh"],
                           "op": ">=", "target": target})
        claims.append({"metric": f"bytes per step, expertmesh / {other}, all ranks, {case}",
                       "value": ours / out["sent_all"][other], "op": "<=", "target": 1.0})
    print(statistics.median(out["times"]["expertmesh"]), med)
    benchlib.write("parallel_layer", {"shape": shape, "world": WORLD, "threads_per_rank": 1, "reps": reps,
                                      "quick": args.quick}, results, claims, out=args.out, threads=1)


if __name__ == "__main__":
    main()
