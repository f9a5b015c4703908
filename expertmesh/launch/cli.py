"""The `expertmesh` command.

  expertmesh run   --config FILE [--nproc N] [--max-restarts R] [key=value ...]   torchrun on this machine
  expertmesh train --config FILE [key=value ...]                                  one rank, in this process
  expertmesh config --config FILE [key=value ...]                                 print the resolved config

Everything that can be checked before processes start (config, parallel degrees against the
process count, data paths) is checked here, so a mistake costs one line, not a torchrun failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from expertmesh import config as config_mod
from expertmesh.config import ConfigError
from expertmesh.parallel.mesh import ParallelDims


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 4


def _preflight(args, nproc: int):
    cfg = config_mod.load(args.config, args.overrides)
    ParallelDims.from_config(cfg.parallel, nproc)
    if cfg.data.source == "files":
        from expertmesh.data.corpus import glob_files

        glob_files(cfg.data.paths)
    return cfg


def cmd_run(args) -> int:
    nproc = args.nproc or default_nproc()
    cfg = _preflight(args, nproc)
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # Huge pages for torch's large CPU allocations: fresh activations otherwise fault in 4 KiB at a time.
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={args.max_restarts}", "-m", "expertmesh.launch.train"]
    if args.config:
        cmd += ["--config", args.config]
    cmd += args.overrides
    return subprocess.call(cmd, env=env)


def cmd_train(args) -> int:
    from expertmesh.launch import train

    return train.main((["--config", args.config] if args.config else []) + args.overrides)


def cmd_config(args) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertmesh", description="Train Mixture-of-Experts transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--config", help="TOML config file (default: the embedded defaults)")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.ep=2")
        return s

    r = with_config("run", "launch a local multi-process run with torchrun")
    r.add_argument("--nproc", type=int, default=0, help="processes (default: GPUs, or 4 on CPU)")
    r.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a worker failure")
    r.set_defaults(func=cmd_run)
    with_config("train", "run one rank in this process (torchrun/Slurm set the environment)").set_defaults(
        func=cmd_train)
    with_config("config", "print the resolved config as JSON").set_defaults(func=cmd_config)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"expertmesh: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
