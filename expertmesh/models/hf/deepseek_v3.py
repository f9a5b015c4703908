"""DeepSeek-V3: multi-head latent attention, YaRN, the first k layers dense, sigmoid routing inside the
best groups with a selection bias (`e_score_correction_bias`), scaled weights, shared experts."""

import logging

from expertmesh.config import ConfigError
from expertmesh.models.hf.adapter import Adapter, base_model_config, need

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # checkpoints whose multi-token-prediction layers were reported skipped


class DeepSeekV3(Adapter):
    model_type = "deepseek_v3"
    shared = "shared_experts"
    router_bias = "e_score_correction_bias"
    latent = True

    def model_config(self, hf: dict, path: str = "") -> dict[str, dict]:
        model = base_model_config(hf, path, self.default_theta)
        nextn = hf.get("num_nextn_predict_layers") or 0
        if nextn and path not in _WARNED:
            _WARNED.add(path)
            first = model["n_layers"]
            log.warning("%s: its %d multi-token-prediction layer(s) (model.layers.%s) are not imported: the model "
                        "trains next-token prediction only, and an export writes num_nextn_predict_layers=0", path,
                        nextn, first if nextn == 1 else f"{first}-{first + nextn - 1}")
        if model["n_kv_heads"] != model["n_heads"]:
            raise ConfigError(f"{path}/config.json: deepseek_v3 needs num_key_value_heads == num_attention_heads")
        model |= {"attention": "mla", "head_dim": 0, "n_kv_heads": 0,
                  "q_lora_rank": hf.get("q_lora_rank") or 0, "kv_lora_rank": need(hf, "kv_lora_rank", path),
                  "qk_rope_head_dim": need(hf, "qk_rope_head_dim", path),
                  "qk_nope_head_dim": need(hf, "qk_nope_head_dim", path), "v_head_dim": need(hf, "v_head_dim", path),
                  "rope_style": "interleaved" if hf.get("rope_interleave", True) else "half",
                  "attn_bias": bool(hf.get("attention_bias", False)), "ffn_dim": need(hf, "intermediate_size", path)}
        moe = {"num_experts": need(hf, "n_routed_experts", path), "top_k": need(hf, "num_experts_per_tok", path),
               "expert_dim": need(hf, "moe_intermediate_size", path), "every": 1,
               "first_k_dense": hf.get("first_k_dense_replace", 0), "shared_experts": hf.get("n_shared_experts") or 0,
               "score_func": "sigmoid", "norm_topk": bool(hf.get("norm_topk_prob", True)),
               "n_groups": hf.get("n_group") or 1, "topk_groups": hf.get("topk_group") or 1,
               "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0))}
        return {"model": model, "moe": moe}
