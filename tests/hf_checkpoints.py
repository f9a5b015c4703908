"""Tiny random checkpoints of each supported Hugging Face family, written by transformers' own
`save_pretrained` (nothing is downloaded). Importable in spawned test ranks."""

from __future__ import annotations

from pathlib import Path

VOCAB = 288  # >= 256 so the byte tokenizer can feed them; divisible by tp 2 and 4

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False)


def hf_config(family: str, **extra):
    import transformers as T

    c = dict(_COMMON) | {k: extra.pop(k) for k in list(extra) if k in _COMMON}
    if family == "qwen3_moe":  # GQA, per-head QK-norm, a head dim that is not dim / heads, a dense first layer
        return T.Qwen3MoeConfig(**c, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                num_experts_per_tok=2, head_dim=16, norm_topk_prob=True, mlp_only_layers=[0], **extra)
    if family == "qwen2_moe":  # q/k/v biases, a gated shared expert, MoE every second layer
        return T.Qwen2MoeConfig(**c, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, **extra)
    if family == "mixtral":
        return T.MixtralConfig(**c, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **extra)
    if family == "olmoe":  # QK-norm over the whole projections, clipping
        c["num_key_value_heads"] = 4
        return T.OlmoeConfig(**c, intermediate_size=16, num_experts=4, num_experts_per_tok=2, clip_qkv=2.0, **extra)
    if family == "deepseek_v3":  # MLA with a q bottleneck, YaRN, grouped sigmoid routing, shared expert, dense first
        c["num_key_value_heads"] = 4
        return T.DeepseekV3Config(
            **c, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 0.707, "mscale_all_dim": 0.707}, **extra)
    raise ValueError(family)


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"]


def make_checkpoint(family: str, out: Path, seed: int = 0, dtype=None, fused: bool = False, **extra) -> Path:
    import torch
    import transformers as T
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(family, **extra))
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a selection bias that matters
                b.copy_(torch.rand(b.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, save_original_format=not fused)
    return out


def hf_model(path: Path, **kw):
    """The transformers model from a directory, eager attention and experts (the reference)."""
    import transformers as T
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = T.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", experts_implementation="eager",
                                                 **kw)
    return (out[0].eval(), out[1]) if kw.get("output_loading_info") else out.eval()


BLOCK = (8, 8)


def _quantize(w):
    """(fp8 weight, per-block factors, the dequantized weight) with blocks of BLOCK, edge blocks partial."""
    import torch

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


def make_fp8_checkpoint(root: Path):
    """DeepSeek-V3's FP8 format, tiny: (fp8 directory, a directory of the same weights dequantized in float32,
    those dequantized weights by key). Block sizes BLOCK that do not divide every shape."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

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


def hf_greedy(path: Path, prompt: list[int], new: int) -> list[int]:
    """transformers' own greedy decoding of the checkpoint: `new` tokens after `prompt` (full forwards)."""
    import torch

    ref = hf_model(path)
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, ref(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt):].tolist()
