"""Shared test helpers (importable in spawned children: tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(run_dir: Path) -> list[str]:
    """Overrides for a model and corpus small enough to train in seconds on one core per rank."""
    return [
        f"train.run_dir={str(run_dir)!r}".replace("'", '"'),
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64",
        "moe.num_experts=4", "moe.expert_dim=32", "moe.every=2",
        "data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000",
        "train.eval_batches=2", "metrics.wandb_mode=\"disabled\"",
    ]


def read_metrics(run_path: Path, kind: str = "train") -> dict[int, dict]:
    """step -> record; a step logged twice (before a kill and after resuming) keeps the later one."""
    out = {}
    for line in (run_path / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["step"]] = rec
    return out


def assert_compiled(records: dict[int, dict], max_graphs: int, pieces: int | None = 1) -> None:
    """`train.compile`'s proof by effect, for every metrics window: each block forward (training, the
    recomputation, evaluation) ran compiled graphs (a frame that Dynamo gave up on runs eagerly: none);
    `pieces` graphs each where the count is fixed (1 for a block without a graph break; None under expert
    parallelism, whose exchange runs eagerly between graphs and whose recomputation stops after the last
    tensor it needs); no more graphs compiled than `max_graphs` (per kind of block, piece and grad mode),
    so a break that nobody planned shows."""
    assert records, "no train records"
    for step, rec in records.items():
        c = rec["compile"]
        assert c["forwards"] > 0 and c["compiled_forwards"] == c["forwards"], (step, c)
        assert pieces is None or c["calls"] == pieces * c["forwards"], (step, c)
        assert 1 <= c["graphs"] <= max_graphs, (step, c)


def failure(r: subprocess.CompletedProcess) -> str:
    """What a failed subprocess said, for an assertion message: the exit code, the child's own last
    traceback (or abort message) from its output, then the last lines. torchrun ends its stderr with its
    own summary ("ChildFailedError ... root cause"), which alone does not say what failed."""
    text = (r.stdout or "") + "\n" + (r.stderr or "")
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line
              or "terminate called" in line or "Fatal Python error" in line]
    cause = ""
    if starts:
        end = starts[-1] + 1
        while end < len(lines) and end - starts[-1] < 60 and (lines[end].startswith((" ", "\t", "[rank"))
                                                               or "Error" in lines[end] or not lines[end].strip()):
            end += 1
        cause = "\n".join(lines[starts[-1]: end + 1])
    return f"exit code {r.returncode}\n--- the child's error ---\n{cause or '(no traceback)'}\n" \
           f"--- last lines ---\n" + "\n".join(lines[-30:])


def expertmesh_run(nproc: int, overrides: list[str], env_extra: dict | None = None, timeout: float = 300,
                   extra_args: tuple = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", "expertmesh.launch.cli", "run", "--nproc", str(nproc), *extra_args, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def wandb_records(run_file: Path) -> list:
    """Decodes a W&B offline `.wandb` file: a leveldb-style log (32 KiB blocks, 7-byte record headers:
    crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B data file"
    block, pos, chunks, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    records = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def assert_restart_reproduces(common: list[str], run_dir: Path) -> None:
    """Runs `common` on 2 ranks twice: uninterrupted, and with rank 1 SIGKILLed after step 7 and
    torchrun restarting the job; the restarted run must resume from step 6 with identical losses."""
    ref = expertmesh_run(2, common + ["train.name=ref"])
    assert ref.returncode == 0, failure(ref)
    crashed = expertmesh_run(2, common + ["train.name=crash"], env_extra={"EXPERTMESH_KILL_AT": "7:1"},
                             extra_args=("--max-restarts", "1"))
    assert crashed.returncode == 0, failure(crashed)
    assert "resumed from" in crashed.stdout and "step-6" in crashed.stdout
    ref_losses = {s: r["loss"] for s, r in read_metrics(run_dir / "ref").items()}
    assert {s: r["loss"] for s, r in read_metrics(run_dir / "crash").items()} == ref_losses


def moe_reference(full, world: int, T: int, skew: bool = False):
    """Inputs for `world` ranks of T tokens and the reference: one process, every expert, each rank's
    tokens routed as their own batch (capacity is per local batch, as in GShard/DeepSpeed; dropless
    routing gives the same as one big batch). `skew`: every token prefers experts 0 and 1. Returns
    (x_all, probe, output, input with its gradient after backward of (out * probe).sum())."""
    import torch

    D = full.router.gate.weight.shape[1]
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * T, D, generator=g)
    if skew:
        x_all = x_all.abs() + 1.0
        with torch.no_grad():
            full.router.gate.weight.zero_()
            full.router.gate.weight[:2] = 1.0
    probe = torch.randn(world * T, D, generator=g)
    x_ref = x_all.clone().requires_grad_()
    out_ref = torch.cat([full(x_ref[r * T:(r + 1) * T].view(1, T, D))[0].reshape(T, D) for r in range(world)])
    (out_ref * probe).sum().backward()
    return x_all, probe, out_ref, x_ref


def assert_rank_matches_reference(layer, full, x_all, probe, out_ref, x_ref, rank: int, T: int, expert_rows):
    """Runs this rank's tokens through the parallel `layer` and compares with the reference: output,
    input gradient, this rank's expert gradients (rows `expert_rows` of the full ones) and the dense
    gradients summed over ranks (dense weights see only local tokens). fp32, atol/rtol 1e-5."""
    import torch
    import torch.distributed as dist

    D = x_all.shape[1]
    part = slice(rank * T, (rank + 1) * T)
    x = x_all[part].clone().requires_grad_()
    out, stats = layer(x.view(1, T, D))
    (out.reshape(-1, D) * probe[part]).sum().backward()
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.reshape(-1, D), out_ref.reshape(-1, D)[part].detach(), **close)
    torch.testing.assert_close(x.grad, x_ref.grad[part], **close)
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(getattr(layer.experts, name).grad, getattr(full.experts, name).grad[expert_rows],
                                   **close)
    for n, p in layer.named_parameters():
        if not n.startswith("experts."):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, dict(full.named_parameters())[n].grad, **close)
    return stats


def chi2_pvalue(counts, probs) -> float:
    """Pearson's chi-squared test of counts against probs (bins with expected < 5 pooled): the p-value."""
    import torch

    n = counts.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def make_run(path, dim, layers, seed, moe_every=99):
    """A randomly initialised tiny model saved as an expertmesh run directory (for `distill.target/draft`)."""
    import torch

    from expertmesh import config
    from expertmesh.distill.models import export_run
    from expertmesh.models.transformer import Transformer

    cfg = config.load(None, [f"model.dim={dim}", f"model.n_layers={layers}", "model.n_heads=2",
                             f"model.ffn_dim={2 * dim}", f"moe.every={moe_every}", "moe.num_experts=4",
                             "moe.expert_dim=16", "model.max_seq_len=128"])
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    return export_run(cfg, model, path), model


def same_global_state(run: Path, workers, steps: int, ranks: int) -> None:
    """Elastic DiLoCo workers `workers` of run dir `run` hold the same global state at their step-`steps`
    checkpoint, rank by rank."""
    import torch

    for rank in range(ranks):
        states = [torch.load(run / f"worker{w}" / f"step-{steps}" / f"rank-{rank}.pt", weights_only=True)["diloco"]
                  for w in workers]
        for key in ("global_copy", "momentum", "global_bias"):  # the balancing biases are part of the global state
            for a, b in zip(states[0][key], states[1][key], strict=True):
                assert torch.equal(a, b), (rank, key)
        assert states[0]["outer_steps"] == states[1]["outer_steps"] > 0
