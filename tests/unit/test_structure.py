"""The package's shape, from its own imports (read with `ast`, nothing imported): no import cycle between
expertmesh's packages, floors that run one way (config at the bottom, the training loop and the launcher at
the top), and a config package that imports neither torch nor anything else of expertmesh."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from helpers import failure

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "expertmesh"
# Each package imports only packages on lower floors (or its own floor's other packages when both are listed
# together and no cycle forms). The entries are the top-level names under expertmesh/.
FLOORS = [["config"], ["data", "metrics", "report"], ["layers", "dist"], ["moe"], ["models"], ["parallel", "distill"],
          ["train"], ["launch"], ["testing"]]


def _imports() -> dict[str, set[tuple[str, str]]]:
    """package -> {(imported package, file)} for every `expertmesh.<package>` import, at any depth of the code."""
    out = defaultdict(set)
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        src = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "expertmesh" and len(parts) > 1 and parts[1] != src and (
                        (PKG / parts[1]).is_dir() or (PKG / f"{parts[1]}.py").is_file()):
                    out[src].add((parts[1], str(rel)))
    return out


def test_every_package_has_a_floor():
    packages = {p.name.removesuffix(".py") for p in PKG.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert packages == {name for floor in FLOORS for name in floor}


def test_imports_run_down_the_floors_and_form_no_cycle():
    floor = {name: i for i, names in enumerate(FLOORS) for name in names}
    graph = _imports()
    upward = sorted(f"{file}: {src} (floor {floor[src]}) imports {dst} (floor {floor[dst]})"
                    for src, edges in graph.items() for dst, file in edges if floor[dst] > floor[src])
    assert not upward, "\n".join(upward)
    # packages on one floor may use each other, but not both ways
    both = sorted({tuple(sorted((a, b))) for a, edges in graph.items() for b, _ in edges
                   if any(d == a for d, _ in graph.get(b, ()))})
    assert not both, both


def test_nothing_below_imports_the_training_loop_or_the_launcher():
    graph = _imports()
    bad = sorted(f"{file} imports expertmesh.{dst}" for src, edges in graph.items() for dst, file in edges
                 if dst in ("train", "launch") and src not in ("launch", "testing"))
    assert not bad, "\n".join(bad)


def test_the_config_package_imports_no_torch_and_nothing_else_of_expertmesh():
    code = ("import sys, expertmesh.config as c; c.load(None, ['parallel.pp=2']); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or "
            "(m.startswith('expertmesh.') and not m.startswith('expertmesh.config'))); print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, failure(r)


# What a parallelism-free model may not name: DTensor unwrapping, hooks left behind by parallelism, torch.distributed.
PARALLEL_NAMES = {"local", "to_local", "local_part", "local_shard", "tp_sync", "placement", "DTensor", "distributed"}


def test_the_model_is_free_of_parallelism():
    """The model's code (models/, moe/, layers/) is plain tensor code: parallelism is attached from outside."""
    bad = []
    for package in ("models", "moe", "layers"):
        for f in sorted((PKG / package).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                names = []
                if isinstance(node, ast.Name):
                    names = [node.id]
                elif isinstance(node, ast.Attribute):
                    names = [node.attr]
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [part for a in node.names for part in a.name.split(".")]
                    names += (node.module or "").split(".") if isinstance(node, ast.ImportFrom) else []
                bad += [f"{f.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n in PARALLEL_NAMES]
    assert not bad, "\n".join(bad)
