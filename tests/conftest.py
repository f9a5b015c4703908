import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # helpers importable by name in spawned children too
os.environ.setdefault("WANDB_SILENT", "true")
if not Path("/dev/nvidiactl").exists():  # Triton's interpreter runs moe.backend="triton" on CPU tensors: the flag
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede triton's import, which any test may cause


@pytest.fixture
def run_distributed():
    """run_distributed(fn, world_size, *args, timeout=180) -> [result per rank]; fn(rank, world, *args)."""
    from expertmesh.testing import spawn

    def _run(fn, world_size, *args, timeout=180.0):
        return spawn(fn, world_size, args=args, timeout=timeout)

    return _run


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a model and corpus small enough to train in seconds on one core per rank."""
    from helpers import tiny_overrides as make

    return make(tmp_path)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """family -> a tiny random checkpoint directory written by transformers (built once per session)."""
    from hf_checkpoints import FAMILIES, make_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return {f: make_checkpoint(f, root / f) for f in FAMILIES}
