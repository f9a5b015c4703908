"""FP8 checkpoints (DeepSeek-V3's format): linear weights stored as float8 e4m3 beside one float32 factor per
block (`*_scale_inv`, `quantization_config.weight_block_size`). expertmesh reads them dequantized: the same
model as from a directory holding the dequantized weights in float32 (computed here block by block, apart
from the reader), any slice of a weight too; other quantization methods are refused by name; an export
writes the weights dequantized and drops the quantization_config."""

import json
import shutil

import pytest
import torch
from hf_checkpoints import make_checkpoint
from safetensors.torch import load_file, save_file

from expertmesh.config import ConfigError
from expertmesh.models.hf import load_pretrained
from expertmesh.models.hf.safetensors_dir import SafetensorsDir

BLOCK = (8, 8)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, per-block factors, the dequantized weight) with blocks of BLOCK, edge blocks partial."""
    bm, bn = BLOCK
    rows, cols = w.shape
    nr, nc = -(-rows // bm), -(-cols // bn)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale, deq = torch.empty(nr, nc), torch.empty(rows, cols)
    for i in range(nr):
        for j in range(nc):
            block = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            s = block.abs().max().clamp(min=1e-12) / 448.0
            qb = (block / s).to(torch.float8_e4m3fn)
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = qb
            scale[i, j] = s
            deq[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = qb.double().mul(float(s)).float()
    return q, scale, deq


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """(fp8 directory, the same weights dequantized in float32), from a tiny DeepSeek-V3 checkpoint."""
    root = tmp_path_factory.mktemp("fp8")
    src = make_checkpoint("deepseek_v3", root / "src")
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    fp8, deq = {}, {}
    quantized = 0
    for key, t in tensors.items():
        # DeepSeek-V3 quantizes every linear weight except the router's, the embedding and the head
        if t.ndim == 2 and key.endswith("proj.weight"):
            q, s, d = _quantize(t)
            fp8[key], fp8[key + "_scale_inv"], deq[key] = q, s, d
            quantized += 1
        else:
            fp8[key] = deq[key] = t.float()
    assert quantized >= 10
    out = {}
    for name, weights, quant in (("fp8", fp8, True), ("deq", deq, False)):
        d = root / name
        d.mkdir()
        for extra in src.iterdir():
            if extra.suffix != ".safetensors" and extra.name != "model.safetensors.index.json":
                shutil.copy(extra, d / extra.name)
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
        hf = json.loads((d / "config.json").read_text())
        hf["dtype"] = "float32"
        if quant:
            hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(BLOCK)}
        (d / "config.json").write_text(json.dumps(hf))
        out[name] = d
    return out["fp8"], out["deq"], deq


def test_an_fp8_checkpoint_loads_as_its_dequantized_weights(fp8_dirs):
    fp8, deq_dir, _ = fp8_dirs
    got, want = load_pretrained(fp8).state_dict(), load_pretrained(deq_dir).state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_any_slice_of_an_fp8_weight_reads_its_blocks(fp8_dirs):
    fp8, _, deq = fp8_dirs
    files = SafetensorsDir(fp8)
    key = next(k for k in deq if k.endswith("mlp.experts.0.down_proj.weight") or k.endswith("down_proj.weight"))
    rows, cols = deq[key].shape
    for index in [(slice(3, rows - 2), slice(5, cols - 1)), (slice(0, 1), slice(None)), (slice(rows - 1, rows),),
                  None]:
        want = deq[key][index] if index is not None else deq[key]
        assert torch.equal(files.read(key, index), want), index
    assert files.dtype(key) == torch.bfloat16  # what an export writes


def test_other_quantizations_and_missing_factors_are_refused(fp8_dirs, tmp_path):
    fp8, _, deq = fp8_dirs
    bad = tmp_path / "gptq"
    shutil.copytree(fp8, bad)
    hf = json.loads((bad / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="quant_method='gptq'.*is not supported"):
        load_pretrained(bad)
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
    (bad / "config.json").write_text(json.dumps(hf))
    weights = load_file(bad / "model.safetensors")
    key = next(k for k in weights if k.endswith("_scale_inv"))
    del weights[key]
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"{key} is missing"):
        load_pretrained(bad)
