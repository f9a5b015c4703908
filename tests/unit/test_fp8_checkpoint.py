"""FP8 checkpoints (DeepSeek-V3's format): linear weights stored as float8 e4m3 beside one float32 factor per
block (`*_scale_inv`, `quantization_config.weight_block_size`). expertmesh reads them dequantized: the same
model as from a directory holding the dequantized weights in float32 (computed here block by block, apart
from the reader), any slice of a weight too; other quantization methods are refused by name; an export
writes the weights dequantized and drops the quantization_config. DeepSeek-V3's multi-token-prediction layers
(`num_nextn_predict_layers`, stored as one layer past the last) are skipped with one warning."""

import json
import shutil

import pytest
import torch
from hf_checkpoints import BLOCK, make_fp8_checkpoint
from safetensors.torch import load_file, save_file

from expertmesh.config import ConfigError
from expertmesh.models.hf import config_for, load_pretrained, tensor_shapes
from expertmesh.models.hf.export import export_hf
from expertmesh.models.hf.safetensors_dir import SafetensorsDir


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """(fp8 directory, the same weights dequantized in float32, those weights), of a tiny DeepSeek-V3."""
    return make_fp8_checkpoint(tmp_path_factory.mktemp("fp8"))


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


def _export(path, out, dtype=None):
    cfg = config_for(path)
    state = {k: v.detach() for k, v in load_pretrained(path).state_dict().items()}
    return export_hf(cfg, tensor_shapes(cfg), state.__getitem__, out, path, dtype)


def test_an_fp8_checkpoint_exports_dequantized_in_bf16_without_its_quantization_config(fp8_dirs, tmp_path):
    fp8, _, deq = fp8_dirs
    out = _export(fp8, tmp_path / "out")
    hf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in hf
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(f))
    assert not any(k.endswith("_scale_inv") for k in written)
    for key, want in deq.items():
        if key.endswith("proj.weight") and want.ndim == 2:  # a quantized weight: bf16 of its dequantized value
            assert written[key].dtype == torch.bfloat16 and torch.equal(written[key], want.bfloat16()), key
    got = load_pretrained(out).state_dict()  # and it loads back as a plain checkpoint
    assert got.keys() == load_pretrained(fp8).state_dict().keys()


def test_multi_token_prediction_layers_are_skipped_with_one_warning(fp8_dirs, tmp_path, caplog):
    _, deq_dir, deq = fp8_dirs
    mtp = tmp_path / "mtp"
    shutil.copytree(deq_dir, mtp)
    hf = json.loads((mtp / "config.json").read_text())
    n = hf["num_hidden_layers"]
    hf["num_nextn_predict_layers"] = 1
    (mtp / "config.json").write_text(json.dumps(hf))
    weights = load_file(mtp / "model.safetensors")
    last = f"model.layers.{n - 1}."
    extra = {k.replace(last, f"model.layers.{n}."): v.clone() for k, v in weights.items() if k.startswith(last)}
    extra |= {f"model.layers.{n}.enorm.weight": torch.ones(hf["hidden_size"]),
              f"model.layers.{n}.eh_proj.weight": torch.randn(hf["hidden_size"], 2 * hf["hidden_size"])}
    save_file(weights | extra, str(mtp / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        got = load_pretrained(mtp).state_dict()
        load_pretrained(mtp)
    warned = [r for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(warned) == 1 and f"model.layers.{n}" in warned[0].getMessage()
    want = load_pretrained(deq_dir).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    out = _export(mtp, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
