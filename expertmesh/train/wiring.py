"""What a training job is built from: its data and tokenizer, the optimizer and schedule, the device
checks, DiLoCo, and the layout name its checkpoints carry. `train/loop.py` wires them together."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from expertmesh.config import ConfigError, JobConfig
from expertmesh.data.chat import load_chat
from expertmesh.data.corpus import glob_files, load_text
from expertmesh.data.tokenizer import BPETokenizer, ByteTokenizer
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.diloco import DiLoCo
from expertmesh.dist.elastic import Membership, read_secret
from expertmesh.dist.env import DistEnv
from expertmesh.moe import ops as moe_ops
from expertmesh.parallel.apply import compute_dtype
from expertmesh.parallel.mesh import ParallelDims

log = logging.getLogger("expertmesh")


def build_tokenizer(cfg: JobConfig, text: str, env: DistEnv, comm: Comm):
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.data.tokenizer == "hf":
        tok = BPETokenizer.load(cfg.data.tokenizer_path or Path(cfg.model.hf_path) / "tokenizer.json")
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens, more than model.vocab_size="
                              f"{cfg.model.vocab_size}")
        return tok
    if cfg.data.tokenizer_path:
        return BPETokenizer.load(cfg.data.tokenizer_path)
    path = cfg.run_path / "tokenizer.json"
    if env.is_rank0 and not path.is_file():  # one rank trains, the others wait and load the same file
        train_text = text[: int(len(text) * (1 - cfg.data.eval_fraction))]  # never the held-out part
        BPETokenizer.train(train_text, cfg.data.bpe_vocab_size, path)
    comm.barrier()
    return BPETokenizer.load(path)


def load_data(cfg: JobConfig, env: DistEnv, comm: Comm):
    """(tokenizer, tokens, labels or None): the text corpus, or chat conversations with their labels."""
    if cfg.data.format == "chat":
        tokenizer = build_tokenizer(cfg, "", env, comm)
        template_dir = Path(cfg.data.tokenizer_path).parent if cfg.data.tokenizer_path else Path(cfg.model.hf_path)
        return (tokenizer, *load_chat(cfg.data, glob_files(cfg.data.paths), tokenizer, template_dir))
    text = load_text(cfg.data)
    tokenizer = build_tokenizer(cfg, text, env, comm)
    return tokenizer, tokenizer.encode(text), None


def build_optimizer(model: torch.nn.Module, cfg: JobConfig):
    o = cfg.optim
    groups = []
    for distributed in (False, True):  # foreach kernels take DTensors and plain tensors in separate groups
        params = [p for p in model.parameters() if isinstance(p, DTensor) == distributed]
        decay = [p for p in params if p.ndim >= 2]  # matrices decay; norms do not
        no_decay = [p for p in params if p.ndim < 2]
        groups += [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    return optimizer, warmup_cosine(optimizer, o.warmup_steps, cfg.train.steps, o.min_lr_ratio)


def warmup_cosine(optimizer, warmup_steps: int, steps: int, min_lr_ratio: float):
    """Linear warmup over `warmup_steps`, then a cosine down to `min_lr_ratio` of the peak at `steps`."""
    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def check_device_support(cfg: JobConfig, device: torch.device, env: DistEnv) -> None:
    """What the config asks of the device, refused in one line when the device cannot honour it."""
    t = cfg.train
    if t.compile and device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++")):
        raise ConfigError("train.compile=true on CPU needs a C++ compiler for inductor; none on PATH (set CXX, "
                          "or train.compile=false)")
    if t.compile and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("train.compile=true on CUDA needs triton, which is not installed (or train.compile=false)")
    if device.type == "cuda" and compute_dtype(cfg, device) and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.mixed_precision={t.mixed_precision!r} means bf16, which "
                          f"{torch.cuda.get_device_name()} does not support; use 'fp32'")
    b = cfg.moe.backend
    if b == "cuda" and (device.type != "cuda" or not moe_ops.cuda_ops_available()):
        raise ConfigError("moe.backend='cuda' but " + ("the job runs on the CPU" if device.type != "cuda" else
                          "expertmesh._C was built without CUDA kernels (rebuild on a machine with nvcc, or "
                          "moe.backend='auto')"))
    if b.startswith("triton") and not moe_ops.triton_available():
        raise ConfigError(f"moe.backend={b!r} needs the triton package, which is not installed (pip install "
                          "triton, or moe.backend='auto')")
    if b == "auto" and device.type == "cuda" and not moe_ops.triton_available() and not moe_ops.cuda_ops_available() \
            and env.is_rank0:
        log.warning("moe.backend='auto': no triton and expertmesh._C has no CUDA kernels, so dispatch and combine "
                    "run the pure-torch reference on the GPU (pip install triton, or rebuild with nvcc)")


def make_diloco(model, cfg: JobConfig, group, comm: Comm, env: DistEnv) -> DiLoCo | None:
    g = cfg.diloco
    if not g.enabled:
        return None
    membership = worker_group = None
    if g.elastic:
        worker_group = dist.group.WORLD if env.world_size > 1 else None
        membership = Membership(g.store, cfg.train.name, g.worker, g.workers, env.rank, g.timeout_s, g.settle_s,
                                worker_group, comm, secret=read_secret(g.secret_file))
    return DiLoCo(model, cfg.model.n_layers, g, group, comm, membership, worker_group)


def layout_name(cfg: JobConfig, dims: ParallelDims) -> str:
    return (("" if dims.pp == 1 else f"pp={dims.pp} ") +
            f"dp_replicate={dims.dp_replicate} dp={dims.dp} ep={dims.ep} tp={dims.tp} "
            f"dp_shard={str(cfg.parallel.dp_shard).lower()} placement={cfg.moe.placement}")
