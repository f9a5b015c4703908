"""What every benchmark shares: the machine description, timing, and the JSON layout of ../shared/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

# Transparent huge pages for torch's large CPU allocations (read once, when torch first allocates):
# without them every fresh 256 MB output costs ~65k page faults, which dwarfs the kernels measured.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """--quick and --out for every benchmark; `extra(parser)` adds a script's own options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller version that runs in under a minute")
    p.add_argument("--out", help="where to write the JSON (default: benchmarks/results/<name>.json)")
    if extra is not None:
        extra(p)
    return p.parse_args()


def machine(threads: int | None = None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": threads if threads is not None else torch.get_num_threads(), "python": platform.python_version(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": len(times)}


def time_alternating(fns: dict, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Times each callable `reps` times, interleaved A B A B …, so machine drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def results_path(name: str, device: str) -> Path:
    """benchmarks/results/<name>.json, or <name>_cuda.json for a run on CUDA: neither overwrites the other."""
    return RESULTS / (f"{name}_cuda.json" if device == "cuda" else f"{name}.json")


def write(name: str, config: dict, results: list[dict], claims: list[dict], out: str | None = None,
          threads: int | None = None, extra: dict | None = None, device: str | None = None) -> Path:
    """Writes the JSON to `out`, else to results_path(name, device).

    `device` defaults to the config's "device" when it names one, else to "cuda" whenever a GPU is
    visible: a run on a GPU machine never replaces the CPU figures in <name>.json.
    """
    device = device or config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(out) if out else results_path(name, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "machine": machine(threads),
        "config": config,
        "results": results,
        "claims": claims,
    }
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"results": results, "claims": claims}, indent=1))
    print(f"wrote {path}")
    return path
