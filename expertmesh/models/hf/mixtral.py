"""Mixtral: grouped-query attention, every layer MoE, top-k renormalized; experts named w1 (gate), w3 (up),
w2 (down) under `block_sparse_moe` on disk."""

from expertmesh.models.hf.adapter import Adapter, base_model_config, need, no_sliding_window


class Mixtral(Adapter):
    model_type = "mixtral"
    moe = "block_sparse_moe"
    expert_names = {"w1": "w1", "w3": "w3", "w2": "w2"}
    default_theta = 1e6

    def model_config(self, hf: dict, path: str = "") -> dict[str, dict]:
        no_sliding_window(hf, path)
        model = base_model_config(hf, path, self.default_theta)
        F = need(hf, "intermediate_size", path)
        model |= {"ffn_dim": F}  # no dense layer uses it
        moe = {"num_experts": hf.get("num_local_experts") or need(hf, "num_experts", path),
               "top_k": need(hf, "num_experts_per_tok", path), "expert_dim": F, "every": 1,
               "norm_topk": True, "score_func": "softmax"}
        return {"model": model, "moe": moe}
