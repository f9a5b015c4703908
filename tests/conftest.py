import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # helpers importable by name in spawned children too
os.environ.setdefault("WANDB_SILENT", "true")


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
    return [
        f"train.run_dir={str(tmp_path)!r}".replace("'", '"'),
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64",
        "moe.num_experts=4", "moe.expert_dim=32", "moe.every=2",
        "data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000",
        "train.eval_batches=2", "metrics.wandb_mode=\"disabled\"",
    ]
