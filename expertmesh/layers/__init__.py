"""Building blocks that both the model (models/) and the MoE layer (moe/) use: the dense SwiGLU."""
