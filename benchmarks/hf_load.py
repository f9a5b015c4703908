"""Loading a Hugging Face MoE checkpoint: expertmesh (1 rank, and 4 ranks under ep4) against transformers'
`from_pretrained`, and exporting it back.

A Qwen3-MoE-shaped random checkpoint (~0.3B parameters, bf16, per-expert keys as the hub's files) is
written here with safetensors. Every load runs in a fresh process, so its peak RSS (ru_maxrss) is its own;
the implementations alternate (A B A B ...). Times are the load call alone (each side's modules are
imported before the clock starts); both
loaders produce an fp32 model on CPU. Under ep4 the 4 ranks load at once on this machine's cores, so
their time is not comparable; their peak RSS per rank is the figure.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib
import torch

FULL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
            num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=2816,
            vocab_size=32000, max_position_embeddings=2048)
QUICK = dict(FULL, hidden_size=128, num_hidden_layers=2, num_experts=8, moe_intermediate_size=64,
             intermediate_size=256, vocab_size=4096, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def write_checkpoint(c: dict, out: Path) -> int:
    """Random bf16 tensors under Qwen3-MoE's keys; returns the parameter count."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    D, H, KV, Dh, E, F = (c[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "num_experts", "moe_intermediate_size"))

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    out.mkdir(parents=True, exist_ok=True)
    total, shard, n = 0, {}, 0
    shards = []

    def flush():
        nonlocal shard
        if shard:
            shards.append(shard)
            shard = {}

    shard["model.embed_tokens.weight"] = rnd(c["vocab_size"], D)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard |= {p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                  p + "self_attn.q_proj.weight": rnd(H * Dh, D), p + "self_attn.k_proj.weight": rnd(KV * Dh, D),
                  p + "self_attn.v_proj.weight": rnd(KV * Dh, D), p + "self_attn.o_proj.weight": rnd(D, H * Dh),
                  p + "self_attn.q_norm.weight": torch.ones(Dh, dtype=torch.bfloat16),
                  p + "self_attn.k_norm.weight": torch.ones(Dh, dtype=torch.bfloat16),
                  p + "mlp.gate.weight": rnd(E, D)}
        for e in range(E):
            shard |= {p + f"mlp.experts.{e}.gate_proj.weight": rnd(F, D), p + f"mlp.experts.{e}.up_proj.weight":
                      rnd(F, D), p + f"mlp.experts.{e}.down_proj.weight": rnd(D, F)}
        flush()
    shard |= {"model.norm.weight": torch.ones(D, dtype=torch.bfloat16), "lm_head.weight": rnd(c["vocab_size"], D)}
    flush()
    weight_map = {}
    for k, s in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(s, name)
        total += sum(t.numel() for t in s.values())
        n += 1
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(c, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], norm_topk_prob=True,
               rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, dtype="bfloat16",
               rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


# ---- the measured children: each prints one JSON line {"seconds", "peak_rss_mb", "base_rss_mb"}

def _rss_mb() -> float:
    """This process's peak resident set (VmHWM: per address space, so a parent's peak before exec does not
    count, as ru_maxrss's would)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_transformers(path: str) -> dict:
    import time

    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _ = transformers.Qwen3MoeForCausalLM  # the lazy imports (torch._dynamo among them) before the clock starts
    base = _rss_mb()
    t0 = time.perf_counter()
    transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(), "base_rss_mb": base}


def child_expertmesh(path: str) -> dict:
    import time

    import safetensors.torch  # noqa: F401  (imported before the clock starts, as transformers' are)
    import torch._dynamo  # noqa: F401  (transformers' import above loads it too; building on meta needs it)

    import expertmesh.models.transformer  # noqa: F401
    from expertmesh.models.hf import load_pretrained

    base = _rss_mb()
    t0 = time.perf_counter()
    load_pretrained(path)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(), "base_rss_mb": base}


def child_export(path: str, out: str) -> dict:
    import time

    from expertmesh.models.hf import config_for, load_pretrained, tensor_shapes
    from expertmesh.models.hf.export import export_hf

    model = load_pretrained(path)
    state = model.state_dict()
    cfg = config_for(path)
    base = _rss_mb()
    t0 = time.perf_counter()
    export_hf(cfg, tensor_shapes(cfg), state.__getitem__, out, path, "bf16")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(), "base_rss_mb": base}


def _ep_rank(rank: int, world: int, path: str) -> dict:
    import time

    from expertmesh.dist.comm_stats import Comm
    from expertmesh.dist.env import DistEnv, init_distributed
    from expertmesh.models.hf import load_config
    from expertmesh.models.transformer import Transformer
    from expertmesh.parallel.apply import parallelize_model
    from expertmesh.parallel.mesh import ParallelDims

    torch.set_num_threads(1)
    cfg = load_config(None, [f'model.hf_path="{path}"', f"parallel.ep={world}", "data.seq_len=128"])
    env = DistEnv(rank, rank, world, world, "torchrun")
    dims = ParallelDims.from_config(cfg.parallel, world)
    init_distributed(env, torch.device("cpu"))
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
    par = parallelize_model(model, dims.build_mesh("cpu"), cfg, torch.device("cpu"), Comm())
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(), "base_rss_mb": base,
            "bytes_read": par.bytes_read}


def child_ep4(path: str) -> dict:
    from expertmesh.testing import spawn

    ranks = spawn(_ep_rank, 4, args=(path,), timeout=600)
    return {"ranks": ranks}


def run_child(kind: str, *args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1), PYTHONPATH=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True, env=env,
                       timeout=1200)
    if r.returncode:
        raise RuntimeError(f"{kind} failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    args = benchlib.parse_args(__doc__)
    shape = QUICK if args.quick else FULL
    reps = 1 if args.quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="hf_load_"))
    try:
        params = write_checkpoint(shape, tmp / "ckpt")
        ckpt = str(tmp / "ckpt")
        runs: dict[str, list[dict]] = {"transformers": [], "expertmesh": []}
        for _ in range(reps):  # alternating, each in a fresh process
            for impl in runs:
                runs[impl].append(run_child(impl, ckpt))
        exports = []
        for i in range(1 if args.quick else 3):
            exports.append(run_child("export", ckpt, str(tmp / f"export{i}")))
        ep4 = run_child("ep4", ckpt)["ranks"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    case = f"qwen3_moe {params / 1e9:.2f}B bf16 -> fp32"
    results = []
    for impl, rows in runs.items():
        results.append({"case": case, "impl": impl, "processes": 1, **benchlib.summarize([r["seconds"] for r in rows]),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
                        "base_rss_mb": max(r["base_rss_mb"] for r in rows)})
    results.append({"case": case, "impl": "expertmesh ep4", "processes": 4,
                    **benchlib.summarize([r["seconds"] for r in ep4]),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in ep4),
                    "base_rss_mb": max(r["base_rss_mb"] for r in ep4),
                    "bytes_read_per_rank": [r["bytes_read"] for r in ep4]})
    results.append({"case": f"qwen3_moe {params / 1e9:.2f}B fp32 -> bf16 files", "impl": "expertmesh export",
                    "processes": 1, **benchlib.summarize([r["seconds"] for r in exports])})
    by = {r["impl"]: r for r in results}
    single_peak = by["expertmesh"]["peak_rss_mb"]
    claims = [
        {"metric": "single-rank load time / transformers from_pretrained (median)",
         "value": by["expertmesh"]["median_s"] / by["transformers"]["median_s"], "op": "<=", "target": 1.0},
        {"metric": "peak RSS per rank at ep4 / single-process peak RSS",
         "value": by["expertmesh ep4"]["peak_rss_mb"] / single_peak, "op": "<=", "target": 0.4},
    ]
    benchlib.write("hf_load", {"shape": shape, "params": params, "reps": reps}, results, claims, args.out,
                   extra={"note": "peak RSS includes the interpreter, torch and (ep4) gloo: base_rss_mb is that "
                                  "part, measured before the load"})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        fn = {"transformers": child_transformers, "expertmesh": child_expertmesh, "export": child_export,
              "ep4": child_ep4}[kind]
        print(json.dumps(fn(*rest)))
    else:
        main()
