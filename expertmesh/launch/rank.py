"""One rank of a job: arguments, logging, SIGTERM, and the error handling every entry point shares
(the trainer and `launch/distill.py`)."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys

import torch.distributed as dist

from expertmesh.config import ConfigError
from expertmesh.dist.checkpoint import CheckpointError
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.env import DistEnv, detect
from expertmesh.models.hf import load_config


def parse_args(argv, prog: str = "expertmesh.launch.train", description: str = "One training rank."):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="TOML config file (default: the embedded defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.ep=2")
    return p.parse_args(argv)


def setup_logging(env: DistEnv) -> None:
    level = logging.INFO if env.is_rank0 else logging.WARNING  # only rank 0 prints progress
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
                        force=True)


def _exit_on_sigterm(signum, frame):
    # torchrun and Slurm stop workers with SIGTERM: unwind normally so `finally` blocks flush metrics.
    raise SystemExit(128 + signum)


def shutdown(finished: bool, timeout_s: float = 120.0) -> None:
    """Ends the process group in order. A rank that finished waits for its peers first (a bounded barrier):
    tearing down its gloo connections while a peer is still inside a collective with it fails the peer.
    Then every group is destroyed and collected while the interpreter is whole, so no process group's
    worker threads are left for interpreter teardown to destroy while still joinable (which aborts the
    process: "terminate called without an active exception", exit code 1 after a finished run)."""
    if not dist.is_initialized():
        return
    if finished and dist.get_world_size() > 1:
        try:
            Comm().barrier(timeout_s=timeout_s)
        except RuntimeError as err:  # a peer failed or hung: its own error is the one that matters
            logging.getLogger("expertmesh").warning("a peer did not reach the end of the run: %s",
                                                    str(err).splitlines()[0][:200])
    dist.destroy_process_group()
    gc.collect()


def rank_main(run_fn, argv=None, **parser) -> int:
    """One rank of a job: parse, detect torchrun/Slurm/single, run; config errors said once, exit 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv, **parser)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    env, finished = None, False
    try:
        env = detect()
        setup_logging(env)
        cfg = load_config(args.config, args.overrides)
        run_fn(cfg, env)
        finished = True
    except (ConfigError, CheckpointError) as e:
        # The same deterministic problem on every rank: say it once.
        if env is None or env.is_rank0:
            print(f"expertmesh: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(finished)
    return 0
