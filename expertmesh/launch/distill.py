"""`expertmesh distill`'s process entry, one per rank (the server and trainer are expertmesh/distill/server.py)."""

from __future__ import annotations

import sys

from expertmesh.distill.server import run
from expertmesh.launch.rank import rank_main


def main(argv=None) -> int:
    return rank_main(run, argv, prog="expertmesh.launch.distill",
                     description="Speculative serving with online draft distillation, one rank.")


if __name__ == "__main__":
    sys.exit(main())
