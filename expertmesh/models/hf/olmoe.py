"""OLMoE: QK-norm over the whole q and k projections, optional clipping of q/k/v, every layer MoE."""

from expertmesh.config import ConfigError
from expertmesh.models.hf.adapter import Adapter, base_model_config, need


class OLMoE(Adapter):
    model_type = "olmoe"

    def model_config(self, hf: dict, path: str = "") -> dict[str, dict]:
        model = base_model_config(hf, path, self.default_theta)
        if model["head_dim"] * model["n_heads"] != model["dim"]:
            raise ConfigError(f"{path}/config.json: olmoe needs head_dim * num_attention_heads == hidden_size")
        F = need(hf, "intermediate_size", path)
        model |= {"qk_norm": "full", "attn_bias": bool(hf.get("attention_bias", False)),
                  "clip_qkv": float(hf.get("clip_qkv") or 0.0), "ffn_dim": F}
        moe = {"num_experts": hf.get("num_experts") or need(hf, "num_local_experts", path),
               "top_k": need(hf, "num_experts_per_tok", path), "expert_dim": F, "every": 1,
               "norm_topk": bool(hf.get("norm_topk_prob", False)), "score_func": "softmax"}
        return {"model": model, "moe": moe}
