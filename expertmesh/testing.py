"""Run a function on N spawned gloo processes: the harness behind the distributed tests and benchmarks.

    results = spawn(fn, world_size=4, args=(cfg,))   # fn(rank, world_size, *args) on every rank

Each child gets a free port, RANK/WORLD_SIZE/LOCAL_RANK in its environment, one torch thread
(so 4+ ranks on 2 cores do not oversubscribe), and an initialized gloo process group. A rank
that raises sends its traceback back; the parent re-raises it with the rank named. A run that
exceeds `timeout` seconds is killed and reported, with whatever ranks had finished.

Children are forked from a server process that imported torch and the training stack once
(`forkserver` with a preload): a fresh interpreter importing them costs seconds per rank, which
was most of a small distributed test's time. No thread runs in the server, so the fork is safe.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback

PRELOAD = ["torch", "torch.distributed", "expertmesh.launch.train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    pass


def _child(fn, rank, world_size, port, threads, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(threads))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    from expertmesh.launch.rank import shutdown

    finished = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        finished = True
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        # as a job's ranks end: a rank done early must not close its connections while a peer still makes
        # a group with it ("Connection reset by peer" in a peer's new_group)
        shutdown(finished)


def spawn(fn, world_size: int, args: tuple = (), timeout: float = 180.0, threads: int = 1) -> list:
    """Returns [fn's return value on rank 0, rank 1, …]; raises RankFailed with the first traceback."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first spawn of this process
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, threads, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) < world_size:
            try:
                rank, status, value = results.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise RankFailed(f"timed out after {timeout:.0f}s; ranks finished: {sorted(outs)}") from None
            if status == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
            outs[rank] = value
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and len(outs) < world_size and results.empty():
                time.sleep(0.5)
                if results.empty():
                    raise RankFailed(f"a rank exited with code {dead[0].exitcode} without reporting")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [outs[r] for r in range(world_size)]
