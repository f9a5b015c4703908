"""The `expertmesh` command.

  expertmesh run   --config FILE [--nproc N] [--max-restarts R] [key=value ...]   torchrun on this machine
  expertmesh train --config FILE [key=value ...]                                  one rank, in this process
  expertmesh distill --config FILE [--nproc N] [key=value ...]      speculative serving + online draft distillation
  expertmesh config --config FILE [key=value ...]                                 print the resolved config
  expertmesh diloco-store HOST:PORT                 the store elastic DiLoCo workers (separate `run` jobs) meet at
  expertmesh plan  --config FILE [--nproc N] [--measured RUN_DIR] [key=value ...]  bytes and memory per rank
  expertmesh submit --config FILE --nodes N (--gpus-per-node G | --procs-per-node P) [--dry-run] …  Slurm
  expertmesh status JOBID                                                         job state + last metrics line
  expertmesh report RUN_DIR                                                       PNG plots + summary.md
  expertmesh export RUN_DIR [--step N] --hf OUT_DIR [--dtype bf16|fp32]   weights back to the HF family's files

Everything that can be checked before processes start (config, parallel degrees against the
process count, data paths) is checked here, so a mistake costs one line, not a torchrun failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from expertmesh.config import ConfigError
from expertmesh.models.hf import load_config
from expertmesh.parallel.mesh import ParallelDims


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 4


def _preflight(args, nproc: int):
    cfg = load_config(args.config, args.overrides)
    ParallelDims.from_config(cfg.parallel, nproc)
    if cfg.parallel.pp > 1:
        from expertmesh.parallel.pipeline import schedule_class

        schedule_class(cfg)
    if cfg.data.source == "files":
        from expertmesh.data.corpus import glob_files

        glob_files(cfg.data.paths)
    if cfg.model.hf_path:  # every key and shape of the checkpoint, before a process starts
        from expertmesh.models.hf import HFSource

        HFSource(cfg)
    return cfg


def cmd_run(args) -> int:
    nproc = args.nproc or default_nproc()
    return _torchrun("expertmesh.launch.train", _preflight(args, nproc), args, nproc)


def _torchrun(module: str, cfg, args, nproc: int) -> int:
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # Huge pages for torch's large CPU allocations: fresh activations otherwise fault in 4 KiB at a time.
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    cmd = [sys.executable, "-m", "expertmesh.launch.agent", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={args.max_restarts}", "-m", module]
    if args.config:
        cmd += ["--config", args.config]
    cmd += args.overrides
    proc = subprocess.Popen(cmd, env=env)
    # SIGUSR1 (checkpoint and stop) goes on to the agent, which relays it to the workers.
    signal.signal(signal.SIGUSR1, lambda signum, _frame: proc.send_signal(signum))
    return proc.wait()


def cmd_distill(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc} must be >= 1")
    if args.nproc > 1 and args.nproc <= cfg.distill.trainers:
        raise ConfigError(f"--nproc={args.nproc} leaves no serving rank beside distill.trainers={cfg.distill.trainers}")
    if args.nproc == 1:
        from expertmesh.launch import distill

        return distill.main((["--config", args.config] if args.config else []) + args.overrides)
    return _torchrun("expertmesh.launch.distill", cfg, args, args.nproc)


def cmd_train(args) -> int:
    from expertmesh.launch import train

    return train.main((["--config", args.config] if args.config else []) + args.overrides)


def cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_diloco_store(args) -> int:
    import logging

    from expertmesh.dist.elastic import serve_store

    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"diloco-store {args.address!r}: give host:port, e.g. 0.0.0.0:29600")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve_store(args.address)
    return 0


def cmd_plan(args) -> int:
    from expertmesh.parallel.plan import plan, render

    cfg = load_config(args.config, args.overrides)
    p = cfg.parallel
    world = args.nproc or (p.pp * p.dp_replicate * p.dp * p.ep * p.tp if p.dp > 0 else default_nproc())
    measured = None
    if args.measured:
        path = Path(args.measured) / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"--measured {args.measured}: no metrics.jsonl there")
        records = [json.loads(line) for line in path.read_text().splitlines()]
        train = [r for r in records if r.get("kind") == "train"]
        if not train:
            raise ConfigError(f"{path} has no training records yet")
        measured = train[-1]["comm_bytes_per_step"]
    gpu = args.gpu_gib
    if gpu is None and cfg.train.device != "cpu":
        import torch

        gpu = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    print(render(plan(cfg, world), measured, gpu))
    return 0


def cmd_submit(args) -> int:
    from expertmesh.launch import slurm

    cfg = load_config(args.config, args.overrides)
    req = slurm.SlurmRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                             partition=args.partition, time=args.time)
    req.check()
    ParallelDims.from_config(cfg.parallel, req.nodes * req.nproc_per_node)
    script = slurm.render(cfg, req, args.config, args.overrides)
    if args.dry_run:
        print(script, end="")
        return 0
    job = slurm.submit(script, cfg.run_path)
    print(f"submitted job {job}; run dir {cfg.run_path.resolve()}, log {cfg.run_path.resolve()}/slurm-{job}.out")
    return 0


def cmd_status(args) -> int:
    from expertmesh.launch import slurm

    print(slurm.status(args.job_id))
    return 0


def cmd_report(args) -> int:
    from expertmesh.report import report

    for path in report(args.run_dir):
        print(path)
    return 0


def cmd_export(args) -> int:
    from expertmesh.models.hf.export import export_run

    out = export_run(args.run_dir, args.hf, args.step, args.dtype, int(args.max_shard_gb * (1 << 30)))
    print(out)
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
    ds = with_config("distill", "serve prompts with speculative decoding and distill the draft online")
    ds.add_argument("--nproc", type=int, default=1, help="processes: 1 serves and trains in this process; N > 1: "
                    "distill.trainers trainer rank(s), the rest serve")
    ds.add_argument("--max-restarts", type=int, default=0, help=argparse.SUPPRESS)
    ds.set_defaults(func=cmd_distill)
    with_config("config", "print the resolved config as JSON").set_defaults(func=cmd_config)
    dst = sub.add_parser("diloco-store", help="serve the store elastic DiLoCo workers meet at (runs until killed)")
    dst.add_argument("address", help="host:port to listen on; workers set diloco.store to it")
    dst.set_defaults(func=cmd_diloco_store)
    pl = with_config("plan", "predicted communication and memory per rank of a layout, without launching it")
    pl.add_argument("--nproc", type=int, default=0, help="world size (default: the product of the degrees if "
                    "parallel.dp is set, else as for run)")
    pl.add_argument("--measured", default="", help="a run directory: print its last measured bytes per step beside")
    pl.add_argument("--gpu-gib", type=float, default=None,
                    help="say whether rank 0's memory fits a GPU of this many GiB (default: the visible GPU's, "
                         "else 80; not said for train.device=\"cpu\")")
    pl.set_defaults(func=cmd_plan)

    s = with_config("submit", "render the sbatch script for a config and submit it to Slurm")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--procs-per-node", type=int, default=0, help="processes per node for a CPU job")
    s.add_argument("--partition", default="")
    s.add_argument("--time", default="04:00:00", help="time limit, as sbatch --time")
    s.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    s.set_defaults(func=cmd_submit)
    st = sub.add_parser("status", help="a Slurm job's state and its run's last metrics line")
    st.add_argument("job_id")
    st.set_defaults(func=cmd_status)
    rp = sub.add_parser("report", help="plots and a summary of a run directory")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)
    ex = sub.add_parser("export", help="a run's weights as a Hugging Face directory of its checkpoint's family")
    ex.add_argument("run_dir")
    ex.add_argument("--hf", required=True, help="output directory (must not exist or be empty)")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    ex.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                    help="tensor dtype (default: each tensor's dtype in the source checkpoint)")
    ex.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors file, GiB")
    ex.set_defaults(func=cmd_export)
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
