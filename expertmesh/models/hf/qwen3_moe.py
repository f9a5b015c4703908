"""Qwen3-MoE: grouped-query attention with per-head QK-norm, softmax top-k routing, no shared expert."""

from expertmesh.models.hf.adapter import Adapter, base_model_config, dense_prefix, need, no_sliding_window


class Qwen3MoE(Adapter):
    model_type = "qwen3_moe"

    def model_config(self, hf: dict, path: str = "") -> dict[str, dict]:
        no_sliding_window(hf, path)
        model = base_model_config(hf, path, self.default_theta)
        model |= {"qk_norm": "head", "attn_bias": bool(hf.get("attention_bias", False)),
                  "ffn_dim": need(hf, "intermediate_size", path)}
        moe = {"num_experts": hf.get("num_experts") or need(hf, "num_local_experts", path),
               "top_k": need(hf, "num_experts_per_tok", path), "expert_dim": need(hf, "moe_intermediate_size", path),
               "every": hf.get("decoder_sparse_step", 1), "first_k_dense": dense_prefix(hf, path),
               "norm_topk": bool(hf.get("norm_topk_prob", False)), "score_func": "softmax"}
        return {"model": model, "moe": moe}
