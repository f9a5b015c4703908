"""`expertmesh plan`: memory per rank read off the sharded model; the CLI's output and errors.
(Predicted communication is checked against measured runs in tests/distributed/test_parallel_layouts.py, and
the pipeline's p2p bytes in tests/distributed/test_pipeline.py.)"""

import subprocess
import sys

import pytest
import torch
from helpers import failure

from expertmesh import config
from expertmesh.models.transformer import Transformer, count_params
from expertmesh.parallel.plan import plan

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _counts(cfg):
    with torch.device("meta"):
        return count_params(Transformer(cfg))


@pytest.mark.parametrize("world, overrides, expected", [
    (1, [], lambda n: n["total"]),
    (4, ["parallel.ep=4", "parallel.dp_shard=false"], lambda n: n["dense"] + n["expert"] / 4),
    # tp halves every matrix but the norms and router gates; ep halves the experts again
    (4, ["parallel.ep=2", "parallel.tp=2", "parallel.dp_shard=false"],
     lambda n: (n["dense"] - n["replicated"]) / 2 + n["replicated"] + n["expert"] / 4),
])
def test_parameter_bytes_per_rank(world, overrides, expected):
    cfg = config.load(None, overrides)
    n = _counts(cfg)
    got = plan(cfg, world).memory["params"]
    m = cfg.model
    n["replicated"] = (2 * m.n_layers + 1) * m.dim + m.n_layers * m.dim * cfg.moe.num_experts
    assert got == 4 * expected(n)


def test_fsdp_shards_the_dense_weights_over_dense_dp():
    cfg = config.load(None, [])
    n = _counts(cfg)
    mem = plan(cfg, 4).memory
    assert 4 * n["total"] / 4 <= mem["params"] < 4 * n["total"] / 4 * 1.02  # FSDP pads dim 0 to a multiple of 4
    assert mem["optimizer"] == 2 * mem["params"] and mem["fsdp_gathered"] > 0


def test_plan_cli_prints_the_table_and_rejects_a_missing_run(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "expertmesh.launch.cli", "plan", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)

    ok = cli("--nproc", "8", "parallel.ep=2", "parallel.tp=2")
    assert ok.returncode == 0, failure(ok)
    for view in ("dense_dp", "expert_dp", "ep", "tp"):
        assert f"  {view}" in ok.stdout
    assert "dp=2 ep=2 tp=2 (world 8)" in ok.stdout and "optimizer" in ok.stdout
    bad = cli("--nproc", "8", "--measured", str(tmp_path), "parallel.ep=2")
    assert bad.returncode == 2 and f"--measured {tmp_path}: no metrics.jsonl there" in bad.stderr
    wrong = cli("--nproc", "6", "parallel.ep=4")
    assert wrong.returncode == 2 and "does not divide WORLD_SIZE(6)" in wrong.stderr


@pytest.mark.parametrize("schedule, v, sends", [
    ("1F1B", 1, [1, 2, 2, 1]),  # forward to the next stage, gradients back to the previous
    # rank r: stages r and r + 4; rank 0 sends 0->1, 4->5 forward and 4->3 back; rank 3 has the last stage
    ("Interleaved1F1B", 2, [3, 4, 4, 3]),
    # rank r: stages r and 7 - r; rank 0 sends 0->1 forward and 7->6 back; rank 3's stages 3 and 4 pass locally
    ("DualPipeV", 2, [2, 4, 4, 2]),
])
def test_pipeline_plan_stages_bubbles_and_p2p(schedule, v, sends):
    cfg = config.load(None, ["parallel.pp=4", "model.n_layers=8", "moe.every=1", f"parallel.pp_schedule={schedule}",
                             f"parallel.pp_stages_per_rank={v}", "parallel.pp_microbatches=8", "train.grad_accum=2"])
    pl = plan(cfg, 4)
    pp = pl.pipeline
    assert pp["bubble"]["1F1B"] == pytest.approx(3 / 11) and pp["bubble"]["Interleaved1F1B"] == pytest.approx(3 / 19)
    assert sorted(s for r in pp["ranks"] for s in r["stages"]) == list(range(4 * v))
    assert sorted(i for r in pp["ranks"] for i in r["layers"]) == list(range(8))
    assert sum(r["params"] for r in pp["ranks"]) == _counts(cfg)["total"]
    d = cfg.data
    boundary = d.batch_size * d.seq_len * cfg.model.dim * 4
    assert [r["p2p_bytes"] for r in pp["ranks"]] == [2 * 8 * n * boundary for n in sends]
    assert pl.comm["pp"] == pp["ranks"][0]["p2p_bytes"]
    if schedule == "1F1B":  # rank r holds p - r micro-batches at the peak
        assert [r["chunks_in_flight"] for r in pp["ranks"]] == [4, 3, 2, 1]
    # rank 0's parameters are its stages' only (no FSDP: one rank per stage)
    assert pl.memory["params"] == 4 * pp["ranks"][0]["params"]


QWEN3_30B_A3B = {  # Qwen3-30B-A3B's config.json (architecture keys): the model configs/finetune_hf.toml names
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    "torch_dtype": "bfloat16"}


def test_the_fine_tune_recipe_fits_an_80_gib_gpu_per_rank(tmp_path):
    """configs/finetune_hf.toml on Qwen3-30B-A3B, 8 ranks: rank 0 needs less than an 80 GiB GPU holds (4 GiB kept
    back) with its recomputation, and far more without it; `fits` says which."""
    import json

    from expertmesh.models.hf import load_config
    from expertmesh.parallel.plan import fits

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    base = [f'model.hf_path="{tmp_path}"', f'data.paths=["{tmp_path}/sft.jsonl"]']
    toml = ROOT / "configs" / "finetune_hf.toml"
    recipe = plan(load_config(toml, base), 8)
    eager = plan(load_config(toml, [*base, 'parallel.activation_checkpoint="none"']), 8)
    # fp32 weights, grads and two AdamW moments of 1/8 of the experts and 1/8 of the dense weights: ~57 GiB
    assert 50 < (recipe.memory["params"] + recipe.memory["grads"] + recipe.memory["optimizer"]) / 2**30 < 60
    assert recipe.memory["total"] / 2**30 < 76 < eager.memory["total"] / 2**30
    assert fits(recipe, 80).startswith("fits a 80 GiB GPU")
    assert fits(eager, 80).startswith("does NOT fit") and 'activation_checkpoint="full"' in fits(eager, 80)
