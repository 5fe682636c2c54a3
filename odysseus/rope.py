"""Rotary position embedding in the rotate-half form (as in Hugging Face Llama)."""

from __future__ import annotations

import torch


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``position_ids: (batch or 1, seq)`` -> two ``(batch or 1, seq, 1, head_dim)``.

    Angles are computed in fp32 (fp64 for fp64 inputs) and then cast, which is what Hugging Face does,
    so bf16 runs agree with it.
    """
    compute = torch.promote_types(dtype, torch.float32)
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).to(compute) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids.to(compute)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: (batch, seq, heads, head_dim)`` by tables from :func:`rope_cos_sin`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on ``q: (B, L, Hq, D)`` and ``k: (B, L, Hkv, D)`` at ``position_ids: (B or 1, L)``."""
    cos, sin = rope_cos_sin(position_ids, head_dim, theta, q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
