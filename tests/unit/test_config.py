import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh import config
from expertmesh.config import ConfigError, JobConfig
from expertmesh.models.hf import load_config
from expertmesh.parallel.mesh import ParallelDims

ROOT = Path(__file__).resolve().parents[2]


def test_default_toml_equals_dataclass_defaults():
    assert config.load(ROOT / "configs" / "default.toml") == JobConfig()


def test_cli_beats_file_beats_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nsteps = 7\nseed = 3\n[optim]\nlr = 0.5\n")
    cfg = config.load(f, ["train.steps=9", "data.paths=[\"a/*.txt\", \"b\"]", "optim.lr=1e-4"])
    assert cfg.train.steps == 9  # CLI over file
    assert cfg.train.seed == 3  # file over default
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.paths == ["a/*.txt", "b"]
    assert cfg.model.dim == JobConfig().model.dim  # default


def test_int_accepted_for_float_and_bare_strings():
    cfg = config.load(None, ["optim.lr=1", "train.name=my-run", "data.paths=x/*.jsonl"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.train.name == "my-run" and cfg.data.paths == ["x/*.jsonl"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.exp=2"], "unknown config key 'parallel.exp' (did you mean 'ep'?)"),
    (["modle.dim=8"], "unknown config key 'modle' (did you mean 'model'?)"),
    (["train.steps=ten"], "train.steps must be an integer, got str 'ten'"),
    (["train.steps=1.5"], "train.steps must be an integer, got float 1.5"),
    (["checkpoint.enabled=1"], "checkpoint.enabled must be true or false, got 1"),
    (["moe.score_func=relu"], "moe.score_func='relu' is not one of 'softmax', 'sigmoid'"),
    (["parallel.ep=3"], "parallel.ep=3 does not divide moe.num_experts=8"),
    (["parallel.tp=3"], "parallel.tp=3 does not divide model.n_heads=4"),
    (["parallel.tp=2", "model.ffn_dim=383"], "parallel.tp=2 does not divide model.ffn_dim=383"),
    (["parallel.tp=2", "moe.expert_dim=127"], "parallel.tp=2 does not divide moe.expert_dim=127"),
    (["parallel.tp=4", "data.seq_len=126"], "parallel.tp=4 does not divide data.seq_len=126"),
    (["parallel.tp=2", "model.vocab_size=257"], "parallel.tp=2 does not divide model.vocab_size=257"),
    (["parallel.tp=2", "model.tie_embeddings=true"], "model.tie_embeddings=true is not supported with parallel.tp=2"),
    (["parallel.ep=4", "moe.num_experts_per_layer=[8, 8, 8, 6]"], "parallel.ep=4 does not divide moe.num_experts=6"),
    (["parallel.activation_checkpoint=some"], "parallel.activation_checkpoint='some' is not one of 'none', 'full'"),
    (["moe.top_k=9"], "moe.top_k=9 exceeds moe.num_experts=8"),
    (["model.n_heads=3"], "model.n_heads=3 does not divide model.dim=128"),
    (["data.seq_len=1024"], "data.seq_len=1024 exceeds model.max_seq_len=512"),
    (["train.steps=0"], "train.steps=0 must be > 0"),
    (["parallel.dp=0"], "parallel.dp=0 must be positive or -1"),
    (["train.steps"], "override 'train.steps' is not of the form section.key=value"),
    (["steps=3"], "override key 'steps' must be section.key"),
    (["data.source=files"], "data.source='files' needs data.paths"),
    # pipeline parallelism, refused with the numbers
    (["model.n_layers=4", "parallel.pp=8"], "parallel.pp=8 x parallel.pp_stages_per_rank=1 = 8 stages exceed "
                                            "model.n_layers=4"),
    (["model.n_layers=4", "parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=4"],
     "8 stages exceed model.n_layers=4"),
    (["parallel.pp=4", "parallel.pp_microbatches=2"], "parallel.pp_schedule='1F1B' with pp=4 needs "
                                                      "parallel.pp_microbatches >= pp=4; got 2"),
    (["parallel.pp=2", "parallel.pp_schedule=DualPipeV", "parallel.pp_stages_per_rank=2", "parallel.pp_microbatches=3"],
     "needs parallel.pp_microbatches >= the 4 stages; got 3"),
    (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2",
      "parallel.pp_microbatches=5"], "a multiple of max(1, microbatches // pp) = 2; got 5"),
    (["model.n_layers=4", "parallel.pp=2", "parallel.pp_layout=[1, 2]"],
     "parallel.pp_layout=[1, 2] must give 2 stages (pp=2 x stages_per_rank=1) of >= 1 layer each, summing to "
     "model.n_layers=4 (it sums to 3)"),
    (["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble"], "parallel.pp_schedule='ZBVZeroBubble' runs exactly 2 "
                                                               "stages per rank; parallel.pp_stages_per_rank=1"),
    (["parallel.pp=2", "parallel.pp_schedule=GPipe2"], "parallel.pp_schedule='GPipe2' is not one of 1F1B, "
                                                        "Interleaved1F1B, ZBVZeroBubble, DualPipeV"),
    (["parallel.pp=2", "model.tie_embeddings=true"], "model.tie_embeddings=true is not supported with parallel.pp=2"),
    (["parallel.pp_stages_per_rank=2"], "need parallel.pp > 1"),
])
def test_bad_values_name_the_key_and_value(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    assert message in str(e.value)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    section_as_value = tmp_path / "s.toml"
    section_as_value.write_text("train = 3\n")
    with pytest.raises(ConfigError, match="'train' is a section"):
        config.load(section_as_value)


@pytest.mark.parametrize("world, p, expected", [
    (1, dict(), (1, 1, 1, 1)),
    (8, dict(ep=2, tp=2), (1, 2, 2, 2)),
    (8, dict(dp_replicate=2, ep=4), (2, 1, 4, 1)),
    (4, dict(dp=4), (1, 4, 1, 1)),
])
def test_parallel_dims_resolve_dp(world, p, expected):
    cfg = config.load(None, [f"parallel.{k}={v}" for k, v in p.items()])
    d = ParallelDims.from_config(cfg.parallel, world)
    assert (d.dp_replicate, d.dp, d.ep, d.tp) == expected


def test_parallel_dims_errors_quote_every_degree():
    cfg = config.load(None, ["parallel.ep=2", "parallel.dp=3"])
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(cfg.parallel, 8)
    assert "dp_replicate(1) * dp(3) * ep(2) * tp(1) = 6 != WORLD_SIZE(8)" in str(e.value)
    cfg = config.load(None, ["parallel.ep=4"])
    with pytest.raises(ConfigError, match=r"= 4 does not divide WORLD_SIZE\(6\)"):
        ParallelDims.from_config(cfg.parallel, 6)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "expertmesh.launch.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_reports_one_line_and_nonzero_exit(tmp_path):
    for args, text in [
        (["config", "parallel.exp=2"], "did you mean 'ep'"),
        (["run", "--nproc", "3", "parallel.ep=2"], "does not divide WORLD_SIZE(3)"),
        (["run", "--nproc", "1", "data.source=files", f"data.paths={tmp_path}/*.txt"], "matched no files"),
    ]:
        r = _cli(*args)
        assert r.returncode == 2, r
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("expertmesh: error:") and text in lines[0], r.stderr


def test_resolved_config_roundtrips_through_json(tmp_path):
    import json

    cfg = config.load(None, ["train.steps=11", "moe.top_k=1"])
    config.save(cfg, tmp_path / "config.json")
    assert config.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_every_shipped_config_loads(hf_dirs):
    # the fine-tuning recipe needs the user's checkpoint and data: a tiny checkpoint and this file stand in
    needs = {"finetune_hf.toml": [f'model.hf_path="{hf_dirs["qwen3_moe"]}"', f'data.paths=["{__file__}"]',
                                  "data.seq_len=64", "model.max_seq_len=64", 'data.tokenizer="byte"',
                                  "parallel.ep=2"]}
    for path in sorted((ROOT / "configs").glob("*.toml")):
        load_config(path, needs.get(path.name, []))  # raises ConfigError naming the key otherwise
    assert config.load(ROOT / "configs" / "distill.toml").distill.synthetic == ["stdlib:200", "headers:200"]


def test_pipeline_schedule_unknown_to_the_installed_torch_is_refused(monkeypatch):
    from torch.distributed.pipelining import schedules

    def lacking(name):
        raise ValueError(f"Unknown schedule name '{name}'")

    from expertmesh.parallel.pipeline import schedule_class

    cfg = config.load(None, ["parallel.pp=2", "parallel.pp_schedule=DualPipeV", "parallel.pp_stages_per_rank=2"])
    monkeypatch.setattr(schedules, "get_schedule_class", lacking)
    with pytest.raises(ConfigError, match=r"parallel.pp_schedule='DualPipeV' is not a schedule of the installed torch "
                                          r"2\.\d+.*Unknown schedule name 'DualPipeV'"):
        schedule_class(cfg)


@pytest.mark.parametrize("overrides, layout", [
    (["parallel.pp_layout=[1, 3]"], [[0], [1, 2, 3]]),
    ([], None),
])
def test_pipeline_layout_explicit_or_balanced(overrides, layout):
    """Explicit layouts are taken as written; the automatic split of 4 equal MoE layers with a big embedding
    and head (vocab 4096) puts fewer layers on the end stages than in the middle."""
    from expertmesh.parallel.pipeline import layer_costs, stage_layout

    base = ["model.n_layers=4", "moe.every=1", "parallel.pp=2"]
    cfg = config.load(None, base + overrides)
    if layout is not None:
        assert stage_layout(cfg) == layout
        return
    cfg = config.load(None, ["model.n_layers=8", "moe.every=1", "parallel.pp=4", "model.vocab_size=16384"])
    got = stage_layout(cfg)
    assert [i for s in got for i in s] == list(range(8)) and all(got)
    assert len(got[0]) < len(got[1]) and len(got[-1]) < len(got[2])
    c = layer_costs(cfg)  # the split is the best contiguous one: no move of a boundary lowers the largest stage
    tp, tf = sum(c["params"]) + c["embedding"][0] + c["head"][0], sum(c["flops"]) + c["head"][1]

    def worst(stages):
        cost = [sum(c["params"][i] / tp + c["flops"][i] / tf for i in s) for s in stages]
        cost[0] += c["embedding"][0] / tp
        cost[-1] += c["head"][0] / tp + c["head"][1] / tf
        return max(cost)

    import itertools
    best = min(worst([list(range(a, b)) for a, b in zip((0, *cuts), (*cuts, 8), strict=True)])
               for cuts in itertools.combinations(range(1, 8), 3))
    assert worst(got) == pytest.approx(best)
