"""What a config asks of the device is refused in one line when the device cannot honour it."""

import shutil

import pytest
import torch

from expertmesh import config
from expertmesh.config import ConfigError
from expertmesh.dist.env import DistEnv
from expertmesh.parallel.apply import compute_dtype
from expertmesh.train.wiring import check_device_support

CPU, ONE = torch.device("cpu"), DistEnv(0, 0, 1, 1, "single")


def test_fp16_is_refused_for_want_of_a_loss_scaler():
    with pytest.raises(ConfigError, match=r"train.mixed_precision='fp16' needs a loss scaler.*use 'bf16'"):
        config.load(None, ['train.mixed_precision="fp16"'])


def test_the_cuda_backend_is_refused_on_a_cpu_job():
    cfg = config.load(None, ['moe.backend="cuda"'])
    with pytest.raises(ConfigError, match=r"moe.backend='cuda' but the job runs on the CPU"):
        check_device_support(cfg, CPU, ONE)


def test_compile_on_cpu_needs_a_cxx_compiler(monkeypatch):
    cfg = config.load(None, ["train.compile=true"])
    check_device_support(cfg, CPU, ONE)  # this machine has one
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.compile=true on CPU needs a C\+\+ compiler"):
        check_device_support(cfg, CPU, ONE)


def test_auto_precision_is_bf16_on_cuda_only():
    auto, fp32 = config.load(None, []), config.load(None, ['train.mixed_precision="fp32"'])
    assert compute_dtype(auto, CPU) is None and compute_dtype(auto, torch.device("cuda")) == torch.bfloat16
    assert compute_dtype(fp32, torch.device("cuda")) is None
    assert compute_dtype(config.load(None, ['train.mixed_precision="bf16"']), CPU) == torch.bfloat16


def test_auto_backend_warns_on_rank_0_when_the_gpu_has_no_kernels(monkeypatch, caplog):
    from expertmesh.moe import ops

    monkeypatch.setattr(ops, "cuda_ops_available", lambda: False)
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    cfg = config.load(None, ['train.mixed_precision="fp32"'])
    gpu = torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger="expertmesh"):
        check_device_support(cfg, gpu, DistEnv(1, 1, 2, 2, "torchrun"))
        assert not caplog.records  # rank 1 says nothing
        check_device_support(cfg, gpu, DistEnv(0, 0, 2, 2, "torchrun"))
    (record,) = caplog.records
    assert "no triton" in record.message and "no CUDA kernels" in record.message and "reference" in record.message
    with pytest.raises(ConfigError, match=r"moe.backend='cuda' but expertmesh._C was built without CUDA kernels"):
        check_device_support(config.load(None, ['moe.backend="cuda"', 'train.mixed_precision="fp32"']), gpu, ONE)


def test_auto_picks_triton_on_a_gpu_and_triton_needs_its_package(monkeypatch):
    """On a GPU `auto` runs the Triton kernels when triton is installed (their source is the one proven on CPU),
    else the CUDA kernels, else the reference; a Triton backend without the package is refused."""
    from expertmesh.moe import ops

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "cuda_ops_available", lambda: True)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    assert ops.resolve_backend("auto", gpu) == "triton" and ops.resolve_backend("auto", CPU) == "cpp"
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert ops.resolve_backend("auto", gpu) == "cuda"
    with pytest.raises(ConfigError, match=r"moe.backend='triton' needs the triton package"):
        check_device_support(config.load(None, ['moe.backend="triton"']), CPU, ONE)
    with pytest.raises(ConfigError, match=r'moe.backend="triton_fused" with parallel.ep > 1 is refused'):
        config.load(None, ['moe.backend="triton_fused"', "parallel.ep=2"])
