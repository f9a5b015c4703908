"""Benchmarks are scripts, not tests; this only checks that each --quick run writes well-formed JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["train_throughput", "moe_ops", "moe_layer", "parallel_layer", "diloco", "fssdp",
                                  "online_distill", "hf_load", "pipeline"])
def test_quick_benchmark_writes_the_documented_json(name, tmp_path):
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["name"] == name and {"cpu", "cores", "torch", "threads"} <= set(doc["machine"])
    assert doc["results"] and all("case" in row and "impl" in row for row in doc["results"])
    for claim in doc["claims"]:
        assert claim["op"] in (">=", "<=") and isinstance(claim["value"], float) and claim["target"] is not None
