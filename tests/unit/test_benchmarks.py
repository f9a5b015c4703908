"""Benchmarks are scripts, not tests; this only checks that each --quick run writes well-formed JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import failure

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["train_throughput", "moe_ops", "moe_layer", "parallel_layer", "diloco", "fssdp",
                                  "online_distill", "hf_load", "pipeline", "noise_floor", "wan",
                                  "diloco_expert_sparse", "draft_head_cost"])
def test_quick_benchmark_writes_the_documented_json(name, tmp_path):
    if name == "wan":  # two network namespaces over a shaped link: root and iproute2
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from wanlab import available

        why = available()
        if why:
            pytest.skip(why)
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, failure(r)
    doc = json.loads(out.read_text())
    assert doc["name"] == name and {"cpu", "cores", "torch", "threads"} <= set(doc["machine"])
    assert doc["results"] and all("case" in row and "impl" in row for row in doc["results"])
    for claim in doc["claims"]:
        assert claim["op"] in (">=", "<=") and isinstance(claim["value"], float) and claim["target"] is not None


def test_a_failed_child_is_reported_by_its_own_error():
    """torchrun ends its stderr with its own summary: the message quotes the child's traceback and abort."""
    stderr = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 3, in run\n"
              "[rank1]: ValueError: token id 300 >= vocab_size 256\n" + "E1203 torchrun noise\n" * 40 +
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\nroot cause (first observed)")
    text = failure(subprocess.CompletedProcess(["torchrun"], 1, "", stderr))
    assert "exit code 1" in text and "ValueError: token id 300 >= vocab_size 256" in text
    abort = failure(subprocess.CompletedProcess(["x"], -6, "step 5\n",
                                                "terminate called without an active exception\n"))
    assert "terminate called without an active exception" in abort.split("--- last lines ---")[0]


def test_the_wan_lab_refuses_in_one_line_without_root_or_iproute2(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import wanlab

    monkeypatch.setattr(wanlab.shutil, "which", lambda tool: None)
    monkeypatch.setattr(wanlab.os, "geteuid", lambda: 0)
    assert wanlab.available() == "the WAN lab needs iproute2: ip, tc not found on PATH"
    monkeypatch.setattr(wanlab.os, "geteuid", lambda: 1000)
    with pytest.raises(wanlab.LabUnavailable, match=r"^the WAN lab builds network namespaces and needs root "
                                                    r"\(euid 1000\)$"):
        wanlab.Lab()
