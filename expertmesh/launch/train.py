"""The training job's process entry, one per rank (the loop itself is expertmesh/train/loop.py).

    torchrun --nproc_per_node 4 -m expertmesh.launch.train --config configs/default.toml train.steps=50
"""

from __future__ import annotations

import sys

from expertmesh.launch.rank import rank_main
from expertmesh.train.loop import run


def main(argv=None) -> int:
    return rank_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
