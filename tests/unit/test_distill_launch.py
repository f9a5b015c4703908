"""`expertmesh distill` in one process: models from run and HF directories, prompt streams, metrics,
responses, the saved draft."""

import json

import pytest
import torch
from helpers import make_run

from expertmesh import config
from expertmesh.config import ConfigError
from expertmesh.dist.env import DistEnv
from expertmesh.distill.models import export_run, load_lm
from expertmesh.distill.online import weights_digest
from expertmesh.launch import distill
from expertmesh.models.transformer import Transformer

SINGLE = DistEnv(0, 0, 1, 1, "single")


def distill_cfg(tmp_path, target, draft, *extra):
    return config.load(None, [f"distill.target={str(target)!r}".replace("'", '"'),
                              f"distill.draft={str(draft)!r}".replace("'", '"'),
                              f"train.run_dir={str(tmp_path / 'runs')!r}".replace("'", '"'),
                              "metrics.wandb_mode=\"disabled\"", "distill.max_new_tokens=12",
                              "distill.prompt_len=12", "distill.update_every=4", "distill.window=6", *extra])


def records(run_path, kind):
    return [r for r in map(json.loads, (run_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_export_and_load_roundtrip(tmp_path):
    path, model = make_run(tmp_path / "m", 32, 2, 0, moe_every=2)  # a MoE model
    loaded, tokenizer, kind = load_lm(path, torch.device("cpu"))
    assert kind == "expertmesh" and tokenizer.vocab_size == 256
    x = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0])
    with pytest.raises(ConfigError, match="not a directory"):
        load_lm(tmp_path / "missing", torch.device("cpu"), "target")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_lm(tmp_path / "empty", torch.device("cpu"), "draft")


def test_single_process_serves_every_request_and_distills(tmp_path):
    target, _ = make_run(tmp_path / "target", 32, 2, 0, moe_every=2)
    draft, _ = make_run(tmp_path / "draft", 16, 1, 1)
    cfg = distill_cfg(tmp_path, target, draft, 'distill.synthetic=["stdlib:10", "headers:8"]', "distill.batch_size=3")
    summary = distill.run(cfg, SINGLE)
    run_path = cfg.run_path
    answered = [json.loads(line) for line in (run_path / "responses-rank0.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in answered) == list(range(18))  # each request once
    assert all(len(r["tokens"]) == 12 for r in answered)
    assert summary["requests"] == 18 and set(summary["domains"]) == {"stdlib", "headers"}
    assert summary["domains"]["stdlib"]["requests"] == 10
    windows = records(run_path, "distill")
    assert [w["requests"] for w in windows] == [6, 12, 18] and all(w["window_requests"] == 6 for w in windows)
    assert set(windows[-1]["domains"]) == {"headers"} and set(windows[1]["domains"]) == {"stdlib", "headers"}
    for w in windows:  # lockstep batches keep the fewest accepted drafts: at most 1 + the mean accepted
        assert 0 < w["alpha"] <= 1 and 0 <= w["accepted_per_drafted"] <= 1
        assert len(w["acceptance_by_position"]) == 4 and all(0 <= a <= 1 for a in w["acceptance_by_position"])
        assert 1 <= w["tokens_per_target_forward"] <= 1 + w["mean_accepted_len"] + 1e-9
    updates = records(run_path, "draft_update")
    assert summary["draft_updates"] == len(updates) == 18 // 4  # one per update_every requests
    saved, _, _ = load_lm(run_path / "draft", torch.device("cpu"))
    assert weights_digest(saved) == updates[-1]["digest"]  # the saved draft is the last version
    from expertmesh.report import report

    paths = report(run_path)  # a distillation run: acceptance, tau and by-position plots and a summary
    assert [p.name for p in paths] == ["acceptance.png", "tau.png", "acceptance_by_position.png", "summary.md"]
    # the last window closes with the batch ending at request 18, before the update it triggers (the 4th)
    assert "requests answered: 18 (3 windows), draft updates: 3" in paths[-1].read_text()


def test_jsonl_prompts_domains_and_errors(tmp_path):
    target, _ = make_run(tmp_path / "target", 32, 1, 0)
    draft, _ = make_run(tmp_path / "draft", 16, 1, 1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "def f(x):\n    return", "domain": "py"},
        {"id": "b", "tokens": [35, 105, 110, 99, 108, 117, 100, 101], "domain": "c"},
        {"id": "c", "prompt": "import os\n", "domain": "py"}]) + "\n")
    cfg = distill_cfg(tmp_path, target, draft, f"distill.prompts={str(prompts)!r}".replace("'", '"'),
                      "distill.online=false", "distill.greedy=true")
    summary = distill.run(cfg, SINGLE)
    assert summary["domains"]["py"]["requests"] == 2 and summary["domains"]["c"]["requests"] == 1
    assert summary["draft_updates"] == 0 and not (cfg.run_path / "draft").exists()  # the static arm
    # a prompt longer than the models' positions is answered with an error; the rest are served
    # every bad request is answered with an error line and the service goes on: too long for the models,
    # a token id past the vocabulary (256), a line that is not JSON, one with neither prompt nor tokens
    prompts.write_text("\n".join([json.dumps({"id": "long", "tokens": [65] * 200}),
                                  json.dumps({"id": "vocab", "tokens": [65, 300]}), "{not json",
                                  json.dumps({"id": "neither"}),
                                  json.dumps({"id": "short", "prompt": "import os\n"})]) + "\n")
    fresh = distill_cfg(tmp_path, target, draft, f"distill.prompts={str(prompts)!r}".replace("'", '"'),
                        "distill.online=false", "train.name=long")
    summary = distill.run(fresh, SINGLE)
    lines = [json.loads(line) for line in (fresh.run_path / "responses-rank0.jsonl").read_text().splitlines()]
    long, vocab, bad_json, neither, short = lines
    assert long["id"] == "long" and "200 prompt tokens" in long["error"] and "128 positions" in long["error"]
    assert vocab["id"] == "vocab" and "token id 300 is outside the models' vocabulary of 256" in vocab["error"]
    assert "prompts.jsonl:3 is not valid JSON" in bad_json["error"]
    assert neither["id"] == "neither" and "prompts.jsonl:4 needs exactly one of 'prompt'" in neither["error"]
    assert short["id"] == "short" and short["tokens"] and "error" not in short and summary["requests"] == 1
    cfg512 = config.load(None, ["model.vocab_size=512"])
    export_run(cfg512, Transformer(cfg512), tmp_path / "other")
    with pytest.raises(ConfigError, match="vocabulary 256 != draft vocabulary 512"):
        distill.run(distill_cfg(tmp_path, target, tmp_path / "other"), SINGLE)


def test_config_errors():
    with pytest.raises(ConfigError, match="domain:count"):
        config.load(None, ['distill.synthetic=["stdlib"]'])
    with pytest.raises(ConfigError, match="distill.gamma=0"):
        config.load(None, ["distill.gamma=0"])
    with pytest.raises(ConfigError, match="distill.positions='some'"):
        config.load(None, ["distill.positions=some"])
    with pytest.raises(ConfigError, match="beta"):
        config.load(None, ["distill.beta=1.0"])


def test_hf_models_greedy_equals_target_greedy(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    with torch.no_grad():
        llama.lm_head.weight.mul_(20)  # a peaked target: greedy ties are impossible
    llama.save_pretrained(tmp_path / "llama")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_embd=16, n_layer=1, n_head=2, n_positions=128)).save_pretrained(tmp_path / "gpt2")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "prompt": "hello world"}) + "\n")
    cfg = distill_cfg(tmp_path, tmp_path / "llama", tmp_path / "gpt2", "distill.greedy=true",
                      f"distill.prompts={str(prompts)!r}".replace("'", '"'), "distill.update_every=1")
    summary = distill.run(cfg, SINGLE)
    (answer,) = [json.loads(line) for line in (cfg.run_path / "responses-rank0.jsonl").read_text().splitlines()]
    target, _, kind = load_lm(tmp_path / "llama", torch.device("cpu"))
    seq = torch.tensor([list(b"hello world")])
    for _ in range(12):  # the target's own greedy decoding, no cache
        seq = torch.cat([seq, target(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert kind == "hf" and answer["tokens"] == seq[0, 11:].tolist()
    assert summary["draft_updates"] == 1
    saved, _, kind = load_lm(cfg.run_path / "draft", torch.device("cpu"))  # the distilled GPT-2, save_pretrained
    assert kind == "hf" and weights_digest(saved) == records(cfg.run_path, "draft_update")[-1]["digest"]


def test_a_rerun_resumes_where_the_stream_stopped(tmp_path):
    """Requests already answered are not answered again (a torn last line is dropped), and the draft
    continues from its last saved version."""
    target, _ = make_run(tmp_path / "target", 32, 1, 0)
    draft, _ = make_run(tmp_path / "draft", 16, 1, 1)
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": f"r{i}", "tokens": [40 + i, 41, 42, 43]}) for i in range(10)]
    prompts.write_text("\n".join(lines[:6]) + "\n")
    args = [f"distill.prompts={str(prompts)!r}".replace("'", '"'), "distill.update_every=2", "distill.save_every=2"]
    first = distill.run(distill_cfg(tmp_path, target, draft, *args), SINGLE)
    run_path = tmp_path / "runs" / "default"
    saved = json.loads((run_path / "draft" / "distill.json").read_text())
    assert first["requests"] == 6 and saved == {"version": 3, "updates": 3}
    responses = run_path / "responses-rank0.jsonl"
    responses.write_text(responses.read_text() + '{"id": "r6", "ind')  # a crash mid-line
    prompts.write_text("\n".join(lines) + "\n")  # the stream goes on
    second = distill.run(distill_cfg(tmp_path, target, draft, *args), SINGLE)
    answered = [json.loads(line) for line in responses.read_text().splitlines()]
    assert [r["id"] for r in answered] == [f"r{i}" for i in range(10)]  # each once, in order
    assert second["requests"] == 4 and [r["draft_version"] for r in answered[6:]][0] == 3
    updates = records(run_path, "draft_update")
    assert [u["version"] for u in updates] == [1, 2, 3, 4, 5] and updates[-1]["requests"] == 10
    windows = records(run_path, "distill")
    assert windows[-1]["requests"] == 10


def test_the_readme_path_to_distill_runs(tmp_path, monkeypatch):
    """docs/distillation.md's three commands, in order, from an empty directory: `make train` (configs/default.toml)
    writes runs/default, configs/draft.toml writes runs/draft, and configs/distill.toml, reading both
    from where they landed, serves and distills (each shortened to a step or a few requests)."""
    from helpers import ROOT

    from expertmesh.train.loop import run as train

    monkeypatch.chdir(tmp_path)
    short = ["train.steps=1", "data.max_bytes=100000", "train.eval_batches=1", 'metrics.wandb_mode="disabled"']
    train(config.load(ROOT / "configs" / "default.toml", short), SINGLE)
    train(config.load(ROOT / "configs" / "draft.toml", short), SINGLE)
    cfg = config.load(ROOT / "configs" / "distill.toml", ['distill.synthetic=["stdlib:2"]', "distill.max_new_tokens=8",
                                                        'metrics.wandb_mode="disabled"', "distill.update_every=2"])
    summary = distill.run(cfg, SINGLE)
    assert summary["requests"] == 2 and summary["draft_updates"] == 1
    assert (tmp_path / "runs" / "distill" / "draft" / "config.json").is_file()



def test_gamma_by_cost_measures_the_target_and_drafts_what_pays(tmp_path):
    """distill.gamma_by_cost: the verification costs measured at start are in the metrics and beside the
    responses, and every round drafts a gamma within [gamma_min, gamma_max]."""
    target, _ = make_run(tmp_path / "target", 32, 2, 0, moe_every=1)
    draft, _ = make_run(tmp_path / "draft", 16, 1, 1)
    cfg = distill_cfg(tmp_path, target, draft, 'distill.synthetic=["stdlib:4"]', "distill.batch_size=2",
                      "distill.gamma_by_cost=true", "distill.gamma_min=1", "distill.gamma=2", "distill.gamma_max=4",
                      "distill.greedy=true", "distill.online=false")
    distill.run(cfg, SINGLE)
    costs = records(cfg.run_path, "spec_costs")[0]
    assert costs["batch"] == 2 and sorted(costs["verify_s"], key=int) == ["2", "3", "4", "5"]
    assert json.loads((cfg.run_path / "spec-costs-rank0.json").read_text())["verify_s"] == costs["verify_s"]
    fitted = [costs["verify_s"][n] for n in sorted(costs["verify_s"], key=int)]
    assert fitted == sorted(fitted) and sorted(costs["verify_measured_s"]) == sorted(costs["verify_s"])
    window = records(cfg.run_path, "distill_summary")[0]
    assert 1 <= window["mean_gamma"] <= 4
    for r in map(json.loads, (cfg.run_path / "responses-rank0.jsonl").read_text().splitlines()):
        assert r["rounds"] <= r["drafted"] <= 4 * r["rounds"] and len(r["tokens"]) == 12
    with pytest.raises(ConfigError, match="two rules for one gamma"):
        distill_cfg(tmp_path, target, draft, "distill.gamma_by_cost=true", "distill.adaptive_gamma=true")


def test_acceptance_by_draft_position_by_hand():
    """Rounds of 3 drafts: request 0 keeps 1 then 3, request 1 keeps 0 then 2. Position 0 is tried in all 4
    rounds and kept in 3; position 1 tried 3 times (after a kept position 0), kept 2; position 2 tried twice,
    kept once."""
    from expertmesh.distill.server import RequestStats, by_position, count_round

    stats = [RequestStats("a", 0, "d", 0), RequestStats("b", 1, "d", 0)]
    for kept in ([1, 0], [3, 2]):
        count_round(stats, 3, kept, [1.0, 1.0])
    assert by_position(stats) == [3 / 4, 2 / 3, 1 / 2]
    assert [s.accepted for s in stats] == [4, 2] and [s.drafted for s in stats] == [6, 6]
