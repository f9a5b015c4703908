"""Hugging Face families in and out, in one process: logits against transformers from the same directory,
an import-export round trip bit for bit, both expert layouts on disk, and bad checkpoints refused."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from hf_checkpoints import FAMILIES, VOCAB, hf_greedy, hf_model, make_checkpoint
from safetensors import safe_open

from expertmesh.config import ConfigError
from expertmesh.launch import cli
from expertmesh.models.hf import load_config, load_pretrained, tensor_shapes
from expertmesh.models.hf.export import export_hf


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (2, 40), generator=g), torch.randint(0, VOCAB, (2, 40), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_dirs, family):
    x, y = _batch()
    ref = hf_model(hf_dirs[family])
    ours = load_pretrained(hf_dirs[family])
    with torch.no_grad():
        want = ref(input_ids=x).logits
        got, stats = ours(x)
    assert want.abs().max() > 1.0  # weights large enough that attention and routing matter
    assert (got - want).abs().max() <= 1e-4
    ce = F.cross_entropy(got.flatten(0, 1), y.flatten())
    assert ce.item() == pytest.approx(F.cross_entropy(want.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    assert len(stats) == sum(1 for b in ours.layers.values() if b.is_moe)


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def _export_model(model, out, source, dtype=None, max_shard_bytes=1 << 30):
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return export_hf(model_cfg(source), tensor_shapes(model_cfg(source)), state.__getitem__, out, source, dtype,
                     max_shard_bytes)


def model_cfg(source):
    from expertmesh.models.hf import config_for

    return config_for(source)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(hf_dirs, tmp_path, family):
    """Import, then export with no training: every source tensor comes back bit for bit, in shards."""
    src = hf_dirs[family]
    out = _export_model(load_pretrained(src), tmp_path / "out", src, max_shard_bytes=40_000)
    want, got = _tensors(src), _tensors(out)
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert torch.equal(got[key], t), key
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    source_config = json.loads((src / "config.json").read_text())
    if source_config.get("num_nextn_predict_layers"):  # DeepSeek-V3's MTP layers are not imported, nor written
        source_config["num_nextn_predict_layers"] = 0
    assert json.loads((out / "config.json").read_text()) == source_config
    ref, info = hf_model(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=x).logits, hf_model(src)(input_ids=x).logits, rtol=0, atol=0)


def test_bf16_round_trip_and_export_dtype(tmp_path):
    src = make_checkpoint("qwen3_moe", tmp_path / "bf16", dtype=torch.bfloat16)
    model = load_pretrained(src)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # trains in fp32
    got, want = _tensors(_export_model(model, tmp_path / "out", src)), _tensors(src)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], t) for k, t in want.items())
    f32 = _tensors(_export_model(model, tmp_path / "f32", src, dtype="fp32"))
    assert all(f32[k].dtype == torch.float32 and torch.equal(f32[k].bfloat16(), t) for k, t in want.items())
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_fused_expert_layout_reads_the_same(hf_dirs, tmp_path):
    """transformers' in-memory layout saved as is (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    fused = make_checkpoint("deepseek_v3", tmp_path / "fused", fused=True)
    assert any(k.endswith("experts.gate_up_proj") for k in _tensors(fused))
    per_expert = load_pretrained(hf_dirs["deepseek_v3"]).state_dict()
    for k, v in load_pretrained(fused).state_dict().items():
        assert torch.equal(v, per_expert[k]), k


def test_tied_embeddings(tmp_path):
    src = make_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    x, _ = _batch()
    ours = load_pretrained(src)
    assert ours.output.weight is ours.tok_embeddings.weight
    with torch.no_grad():
        assert (ours(x)[0] - hf_model(src)(input_ids=x).logits).abs().max() <= 1e-4
    assert sorted(_tensors(_export_model(ours, tmp_path / "out", src))) == sorted(_tensors(src))


def _broken(hf_dirs, tmp_path, family="qwen3_moe"):
    d = tmp_path / "broken"
    shutil.copytree(hf_dirs[family], d)
    return d


def _rewrite(d, drop=(), change=None):
    from safetensors.torch import save_file

    t = _tensors(d)
    for k in drop:
        del t[k]
    if change:
        t[change[0]] = change[1]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints_are_refused_in_one_line(hf_dirs, tmp_path, capsys):
    cases = []
    d = _broken(hf_dirs, tmp_path)
    cases.append((tmp_path / "nope", "is not a directory"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "has no config.json"))
    cfg = json.loads((d / "config.json").read_text())
    other = tmp_path / "llama"
    shutil.copytree(d, other)
    (other / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    cases.append((other, "model_type 'llama' is not supported (supported: deepseek_v3, mixtral, olmoe, qwen2_moe, "
                         "qwen3_moe)"))
    missing = tmp_path / "missing"
    shutil.copytree(d, missing)
    _rewrite(missing, drop=["model.layers.1.mlp.experts.3.up_proj.weight"])
    cases.append((missing, "has no tensor model.layers.1.mlp.experts.3.up_proj.weight"))
    shaped = tmp_path / "shaped"
    shutil.copytree(d, shaped)
    _rewrite(shaped, change=("model.layers.2.self_attn.k_proj.weight", torch.zeros(16, 32)))
    cases.append((shaped, "model.layers.2.self_attn.k_proj.weight has shape [16, 32], the config needs [32, 32]"))
    sharded = tmp_path / "sharded"
    shutil.copytree(d, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    keys = list(_tensors(sharded))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    cases.append((sharded, "shard file model-00002-of-00002.safetensors named in model.safetensors.index.json is "
                           "missing"))
    for path, message in cases:
        run_dir = tmp_path / "runs"
        code = cli.main(["run", "--nproc", "1", f'model.hf_path="{path}"', f'train.run_dir="{run_dir}"'])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (path, err)
        assert not run_dir.exists()


def test_overrides_that_contradict_the_checkpoint(hf_dirs, tmp_path, capsys):
    path = hf_dirs["qwen3_moe"]
    assert cli.main(["config", f'model.hf_path="{path}"', "model.dim=64"]) == 2
    assert "model.dim=64 contradicts model.hf_path=" in capsys.readouterr().err
    assert cli.main(["config", f'model.hf_path="{path}"', "model.dim=32", "model.max_seq_len=48",
                     "moe.aux_loss_coef=0.0"]) == 0  # agreeing values and free keys are fine
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["max_seq_len"] == 48 and resolved["model"]["head_dim"] == 16
    assert resolved["moe"]["first_k_dense"] == 1 and resolved["model"]["qk_norm"] == "head"
    with pytest.raises(ConfigError, match="moe.residual"):
        model_cfg_with(path, "moe.residual=true")


def model_cfg_with(path, *overrides):
    from expertmesh.models.hf import config_for

    return config_for(path, overrides)


def test_distill_serves_an_hf_moe_target_with_our_model(hf_dirs, tmp_path):
    """`expertmesh distill` with a Qwen3-MoE target: loaded as expertmesh's model, its greedy answer is
    transformers' own greedy decoding of the same checkpoint."""
    import transformers

    from expertmesh import config
    from expertmesh.dist.env import DistEnv
    from expertmesh.distill.models import load_lm
    from expertmesh.launch import distill
    from expertmesh.models.transformer import Transformer

    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=64)).save_pretrained(tmp_path / "gpt2")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "prompt": "hello world"}) + "\n")
    target_dir = hf_dirs["qwen3_moe"]
    cfg = config.load(None, [f'distill.target="{target_dir}"', f'distill.draft="{tmp_path / "gpt2"}"',
                             f'train.run_dir="{tmp_path / "runs"}"', 'metrics.wandb_mode="disabled"',
                             "distill.max_new_tokens=12", "distill.greedy=true", f'distill.prompts="{prompts}"'])
    distill.run(cfg, DistEnv(0, 0, 1, 1, "single"))
    (answer,) = [json.loads(line) for line in (cfg.run_path / "responses-rank0.jsonl").read_text().splitlines()]
    target, _, kind = load_lm(target_dir, torch.device("cpu"), "target")
    assert kind == "expertmesh-hf" and isinstance(target, Transformer)
    assert answer["tokens"] == hf_greedy(target_dir, list(b"hello world"), 12)


def test_export_command(hf_dirs, tmp_path, capsys):
    """`expertmesh export` of a 2-step run: bf16 files that transformers loads with the run's weights; bad
    requests are one line and exit 2, with nothing written."""
    from expertmesh.dist.checkpoint import load_model
    from expertmesh.dist.env import DistEnv
    from expertmesh.models.transformer import Transformer
    from expertmesh.train.loop import run

    src = hf_dirs["olmoe"]
    overrides = [f'model.hf_path="{src}"', f'train.run_dir="{tmp_path}"', "train.name=ft", "train.steps=2",
                 "checkpoint.every=1", "data.seq_len=32", "data.batch_size=2", "data.max_bytes=50000",
                 "train.eval_batches=1", 'metrics.wandb_mode="disabled"']
    cfg = load_config(None, overrides)
    run(cfg, DistEnv(0, 0, 1, 1, "single"))
    assert (tmp_path / "ft" / "hf_source" / "config.json").is_file()
    assert cli.main(["export", str(tmp_path / "ft"), "--step", "1", "--hf", str(tmp_path / "out"), "--dtype",
                     "bf16"]) == 0
    got = _tensors(tmp_path / "out")
    assert sorted(got) == sorted(_tensors(src)) and all(t.dtype == torch.bfloat16 for t in got.values())
    ours = Transformer(cfg)
    ours.init_rope()
    load_model(tmp_path / "ft" / "step-1", ours)
    assert torch.equal(got["model.layers.1.mlp.experts.2.down_proj.weight"],
                       ours.layers["1"].ffn.experts.w2[2].t().bfloat16())
    capsys.readouterr()
    for argv, message in [
        (["export", str(tmp_path / "ft"), "--hf", str(tmp_path / "out")], "exists and is not empty"),
        (["export", str(tmp_path / "ft"), "--step", "7", "--hf", str(tmp_path / "o2")], "--step 7"),
        (["export", str(tmp_path / "nothing"), "--hf", str(tmp_path / "o3")], "is not a run directory"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
