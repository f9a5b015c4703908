"""The GPU machine's script (tests/gpu/device_check.sh) and the CUDA results' file names, checked on CPU.

The script itself only runs on a GPU machine; here it must parse, find everything it names in --dry
mode (and name what is missing), and keep going past failed steps within its time budget.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import failure

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "device_check.sh"
STEPS = ["nvidia_smi", "torch_cuda", "toolchain", "build", "cuda_ops", "pytest_gpu", "train_compile", "train_eager",
         "pytest_triton", "bench_triton_moe", "bench_moe_ops", "bench_moe_layer"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DRY", "EXPERTMESH_ROOT", "DEVICE_CHECK_BUDGET")}
    return {**env, "PY": sys.executable, **extra}


def _run(script: Path, *args, cwd=ROOT, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=120)


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, failure(r)


def test_dry_run_finds_everything_and_prints_every_step():
    r = _run(SCRIPT, "--dry")
    assert r.returncode == 0, failure(r)
    for step in STEPS:
        assert f"[dry] {step} " in r.stdout


def test_dry_run_names_a_missing_file(tmp_path):
    # A copy of the checkout (symlinks) without benchmarks/moe_layer.py; the script finds its root from its own path.
    for entry in ROOT.iterdir():
        if entry.name != "benchmarks":
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "benchmarks").mkdir()
    for entry in (ROOT / "benchmarks").iterdir():
        if entry.name != "moe_layer.py":
            (tmp_path / "benchmarks" / entry.name).symlink_to(entry)
    r = _run(tmp_path / "tests" / "gpu" / "device_check.sh", "--dry", cwd=tmp_path)
    assert r.returncode != 0
    assert f"missing {tmp_path}/benchmarks/moe_layer.py" in r.stdout
    assert "[dry]" not in r.stdout


def test_steps_continue_past_failures_within_the_budget(tmp_path):
    # A stand-in Python: every step "succeeds" at once except the GPU tests, which hang past the budget.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\necho "fake python $*"\ncase "$*" in *pytest*) exec sleep 60;; esac\n')
    fake.chmod(0o755)
    r = _run(SCRIPT, PY=str(fake), OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), DEVICE_CHECK_BUDGET="10")
    assert r.returncode == 1, r.stdout + r.stderr
    logs = tmp_path / "out" / "device_check"
    summary = {s["name"]: s for s in json.loads((logs / "summary.json").read_text())}
    assert list(summary) == STEPS
    assert summary["build"]["rc"] == 0 and summary["cuda_ops"]["rc"] == 0
    assert summary["pytest_gpu"]["rc"] == 124  # killed at the budget, not after its own 180 s
    assert all(summary[s]["rc"] == -1 for s in STEPS[6:])  # no budget left: skipped, recorded
    assert "fake python -m pip install" in (logs / "build.log").read_text()
    assert "TORCH_CUDA_ARCH_LIST=9.0" in (logs / "build.log").read_text()


def _benchlib(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # benchlib sets it on import; undone after the test
    return importlib.import_module("benchlib")


def test_cuda_results_never_overwrite_cpu_results(tmp_path, monkeypatch):
    benchlib = _benchlib(monkeypatch)
    monkeypatch.setattr(benchlib, "RESULTS", tmp_path)
    monkeypatch.setattr(benchlib, "machine", lambda threads=None: {"cpu": "test"})  # no GPU to describe
    monkeypatch.setattr(benchlib, "git_commit", lambda: "test")
    monkeypatch.setattr(benchlib.torch.cuda, "is_available", lambda: False)
    assert benchlib.write("ops", {"device": "cpu"}, [], []) == tmp_path / "ops.json"
    assert benchlib.write("layer", {}, [], []) == tmp_path / "layer.json"  # no device named, no GPU: CPU
    assert benchlib.write("ops", {"device": "cuda"}, [], []) == tmp_path / "ops_cuda.json"  # as moe_ops on a GPU
    monkeypatch.setattr(benchlib.torch.cuda, "is_available", lambda: True)
    assert benchlib.write("layer", {}, [], []) == tmp_path / "layer_cuda.json"  # as moe_layer on a GPU machine
    assert benchlib.write("layer", {}, [], [], device="cpu") == tmp_path / "layer.json"
    assert benchlib.write("ops", {"device": "cuda"}, [], [], out=str(tmp_path / "x.json")) == tmp_path / "x.json"
    assert json.loads((tmp_path / "ops.json").read_text())["config"] == {"device": "cpu"}
