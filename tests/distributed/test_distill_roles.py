"""`expertmesh distill` through torchrun over gloo: one trainer and two servers (overlapped updates, W&B),
and two trainers (gradients averaged between them) with two servers, updates between batches."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, failure, make_run, wandb_records

pytestmark = pytest.mark.distributed


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("trainers,overlap", [(1, True), (2, False)])
def test_servers_use_the_trainers_weights_and_answer_each_request_once(tmp_path, trainers, overlap):
    target, _ = make_run(tmp_path / "target", 32, 2, 0, moe_every=2)
    draft, _ = make_run(tmp_path / "draft", 16, 1, 1)
    cmd = [sys.executable, "-m", "expertmesh.launch.cli", "distill", "--nproc", str(trainers + 2),
           f"distill.target={target}", f"distill.draft={draft}", f"train.run_dir={tmp_path / 'runs'}",
           'distill.synthetic=["stdlib:9", "headers:8"]', "distill.max_new_tokens=10", "distill.prompt_len=10",
           "distill.update_every=3", "distill.window=5", "distill.batch_size=2",
           f"distill.overlap={str(overlap).lower()}", f"distill.trainers={trainers}",
           f"metrics.wandb_mode={'offline' if overlap else 'disabled'}", "train.threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, failure(proc)
    run = tmp_path / "runs" / "default"
    metrics = lines(run / "metrics.jsonl")
    updates = {r["version"]: r["digest"] for r in metrics if r["kind"] == "draft_update"}
    assert len(updates) >= 3
    answered = []
    for rank in (trainers, trainers + 1):
        swaps = lines(run / f"swaps-rank{rank}.jsonl")
        # every version the trainer made reached this server, bit for bit
        assert {s["version"]: s["digest"] for s in swaps} == updates
        responses = lines(run / f"responses-rank{rank}.jsonl")
        versions = [r["draft_version"] for r in responses]
        assert versions == sorted(versions)  # swapped between requests, never back
        assert {r["index"] % 2 for r in responses} == {rank - trainers}  # this server's share of the stream
        answered += responses
    assert sorted(r["index"] for r in answered) == list(range(17))  # none lost, none answered twice
    assert not any((run / f"responses-rank{r}.jsonl").exists() for r in range(trainers))  # trainers only train
    (summary,) = [r for r in metrics if r["kind"] == "distill_summary"]
    assert summary["requests"] == 17 and summary["draft_version"] == max(updates)
    assert [r["requests"] for r in metrics if r["kind"] == "distill"][-1] == 17
    if not overlap:  # updates land before the next batch: later requests use newer drafts
        assert max(r["draft_version"] for r in answered) >= 2
        return
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")  # W&B mirrors the windows at step = requests
    logged = {}
    for r in wandb_records(run_file):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            if "distill/alpha" in items:
                logged[int(items["_step"])] = (float(items["distill/alpha"]), "distill/headers/alpha" in items)
    windows = [r for r in metrics if r["kind"] == "distill"]
    assert logged == {w["requests"]: (pytest.approx(w["alpha"]), "headers" in w["domains"]) for w in windows}


def test_a_resumed_job_with_two_servers_continues_the_stream_and_the_draft(tmp_path):
    """A rerun of the run directory (1 trainer, 2 servers) starts from the saved draft version on both sides:
    the trainer sends nothing the servers already hold, every later version reaches them bit for bit, and the
    stream goes on where it stopped."""
    target, _ = make_run(tmp_path / "target", 32, 2, 0, moe_every=2)
    draft, _ = make_run(tmp_path / "draft", 16, 1, 1)

    def distill(synthetic):
        cmd = [sys.executable, "-m", "expertmesh.launch.cli", "distill", "--nproc", "3", f"distill.target={target}",
               f"distill.draft={draft}", f"train.run_dir={tmp_path / 'runs'}", f"distill.synthetic={synthetic}",
               "distill.max_new_tokens=8", "distill.prompt_len=10", "distill.update_every=2", "distill.batch_size=2",
               "distill.save_every=1", "distill.trainers=1", "metrics.wandb_mode=disabled", "train.threads=1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
        assert proc.returncode == 0, failure(proc)

    run = tmp_path / "runs" / "default"
    distill('["stdlib:6"]')
    first = json.loads((run / "draft" / "distill.json").read_text())["version"]
    assert first >= 1
    distill('["stdlib:6", "headers:6"]')
    updates = {r["version"]: r["digest"] for r in lines(run / "metrics.jsonl") if r["kind"] == "draft_update"}
    assert max(updates) > first
    for rank in (1, 2):
        swapped = {s["version"]: s["digest"] for s in lines(run / f"swaps-rank{rank}.jsonl")}
        assert {v: d for v, d in updates.items() if v > first} == {v: d for v, d in swapped.items() if v > first}
    answered = [r["index"] for rank in (1, 2) for r in lines(run / f"responses-rank{rank}.jsonl")]
    assert sorted(answered) == list(range(12))


def test_a_draft_head_is_distilled_by_a_trainer_and_served_by_two_servers(tmp_path):
    """`distill.draft = "head"` with one trainer and two servers (dynamic trees valued by counted acceptance,
    greedy, overlapped updates): the servers send the features and distributions their verification passes
    computed, the trainer (which runs no target forward) trains the head on them, and every version reaches
    both servers bit for bit; the answers stay the target's greedy decoding; the saved head is the last version;
    the summary counts both servers' tested nodes (at least the root's children, every round of every request)."""
    import torch

    from expertmesh.distill.head import load_head
    from expertmesh.distill.online import weights_digest

    target, model = make_run(tmp_path / "target", 32, 4, 0, moe_every=2)
    cmd = [sys.executable, "-m", "expertmesh.launch.cli", "distill", "--nproc", "3", f"distill.target={target}",
           "distill.draft=head", f"train.run_dir={tmp_path / 'runs'}", 'distill.synthetic=["stdlib:12"]',
           "distill.max_new_tokens=8", "distill.prompt_len=10", "distill.update_every=2", "distill.batch_size=2",
           "distill.tree_nodes=3", "distill.tree_depth=2", "distill.tree_topk=2", "distill.greedy=true",
           "distill.trainers=1", "metrics.wandb_mode=disabled",
           "train.threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, failure(proc)
    run = tmp_path / "runs" / "default"
    updates = {r["version"]: r["digest"] for r in lines(run / "metrics.jsonl") if r["kind"] == "draft_update"}
    assert len(updates) >= 3
    for rank in (1, 2):
        assert {s["version"]: s["digest"] for s in lines(run / f"swaps-rank{rank}.jsonl")} == updates
    head, _, meta = load_head(run / "draft_head")
    assert meta["version"] == max(updates) and weights_digest(head) == updates[max(updates)]
    answered = [r for rank in (1, 2) for r in lines(run / f"responses-rank{rank}.jsonl")]
    assert sorted(r["index"] for r in answered) == list(range(12))
    summary = [r for r in lines(run / "metrics.jsonl") if r["kind"] == "distill_summary"][-1]
    rounds = sum(r["rounds"] for r in answered)
    tested = sum(v["tested"] for v in summary["tree_acceptance"].values())
    assert rounds * 0.999 ** rounds <= tested <= rounds * 3, (tested, rounds)  # 3 nodes a request a round at most
    from expertmesh import config
    from expertmesh.data.tokenizer import ByteTokenizer
    from expertmesh.distill.stream import requests

    cfg = config.load(None, ['distill.synthetic=["stdlib:12"]', "distill.prompt_len=10"])
    prompts = {r.index: r.tokens for r in requests(cfg.distill, ByteTokenizer(), cfg.train.seed)}
    model.eval()
    with torch.no_grad():
        for r in answered:
            seq = torch.tensor([prompts[r["index"]]])
            for _ in range(8):
                seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
            assert r["tokens"] == seq[0, 10:].tolist(), r["index"]
