"""Where this process sits: torchrun, Slurm, or a plain single process, read through one path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from expertmesh.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _int(environ, key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect(environ=None) -> DistEnv:
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world, rank = _int(environ, "WORLD_SIZE"), _int(environ, "RANK")
        local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
        launcher = "torchrun"
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "MASTER_ADDR" in environ:
        # One Slurm task per process (srun without torchrun); the sbatch script exports MASTER_ADDR/PORT.
        world, rank = _int(environ, "SLURM_NTASKS"), _int(environ, "SLURM_PROCID")
        local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        nodes = _int(environ, "SLURM_NNODES") if "SLURM_NNODES" in environ else 1
        local_world = world // max(nodes, 1)
        per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
        if per_node.isdigit() and int(per_node) * nodes != world:
            raise ConfigError(f"SLURM_NTASKS={world} != SLURM_NNODES({nodes}) * SLURM_NTASKS_PER_NODE({per_node})")
        launcher = "slurm"
    else:
        return DistEnv(0, 0, 1, 1, "single")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if not 0 <= local_rank < local_world or local_world > world:
        raise ConfigError(f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}, WORLD_SIZE={world} "
                          "are inconsistent")
    return DistEnv(rank, local_rank, world, local_world, launcher)


def pick_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but torch sees no CUDA device")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """gloo on CPU, nccl on GPU. A single process creates no process group, except a launched one on a GPU
    (`expertmesh run --nproc 1`), which runs NCCL at world size 1 as a larger job would."""
    if dist.is_initialized() or (env.world_size == 1 and (device.type != "cuda" or env.launcher == "single")):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, store=_attempt_store(env),
                            device_id=device if device.type == "cuda" else None)


def _attempt_store(env: DistEnv, environ=None):
    """Under torchrun the workers share the agent's TCPStore, and after a restart (--max-restarts) the
    new workers find the old workers' keys there: gloo then connects to the dead processes' ports and
    fails. Namespacing every key by the restart count gives each attempt a clean store. Outside
    torchrun: None, and init_process_group reads MASTER_ADDR/MASTER_PORT as usual."""
    environ = os.environ if environ is None else environ
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), env.world_size, is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"expertmesh/attempt_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def set_threads(requested: int, env: DistEnv) -> int:
    n = requested or max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(n)
    return n


def control_group(device: torch.device):
    """The group for host values that every rank must agree on each step (the preemption flag): gloo,
    so agreeing needs no device sync. Under gloo it is the job's own group; under NCCL a gloo group
    over the same ranks is made beside it. None for a single process."""
    if not dist.is_initialized():
        return None
    if str(dist.get_backend()) == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")
