"""Math on local tensors, no process group: RMSNorm, SwiGLU, RoPE, attention (flash-attn or SDPA), packed
sequences, the chunked linear cross-entropy, and recomputation (checkpoint with optional host offload)."""
