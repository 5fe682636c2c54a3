"""Rotary position embedding in the rotate-half form (as in Hugging Face Llama), with transformers' scalings.

Plain RoPE is computed here from ``rope_theta`` (no transformers needed). Scaled RoPE (linear, llama3, yarn,
longrope) takes its frequencies and attention scaling from transformers' own RoPE init functions
(``ROPE_INIT_FUNCTIONS``), computed once per config, so every module and the reference share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeFrequencies:
    """The RoPE of one :class:`~odysseus.TransformerConfig`: ``cos_sin`` turns positions into rotation tables."""

    head_dim: int
    theta: float
    inv_freq: tuple[float, ...] | None = None
    """Scaled frequencies (``head_dim // 2``); None: plain ``theta ** (-2j / head_dim)``, computed in the
    compute dtype."""
    attention_scaling: float = 1.0
    """Factor on cos and sin (yarn, longrope), as transformers applies it."""
    long_inv_freq: tuple[float, ...] | None = None
    """longrope: the frequencies used once the sequence (largest position + 1) exceeds ``original_max``."""
    original_max: int = 0

    @classmethod
    def of(cls, config) -> RopeFrequencies:
        """The frequencies of ``config`` (transformers' ``ROPE_INIT_FUNCTIONS`` for a scaled RoPE)."""
        if config.rope_scaling is None:
            return cls(config.head_dim, config.rope_theta)
        init, hf_config = _transformers_init(config)
        inv_freq, scaling = init(hf_config, None)
        short = _floats(inv_freq, config.head_dim)
        if config.rope_type != "longrope":
            return cls(config.head_dim, config.rope_theta, short, float(scaling))
        original = int(hf_config.rope_parameters["original_max_position_embeddings"])
        long_freq = _floats(init(hf_config, None, seq_len=original + 1)[0], config.head_dim)
        return cls(config.head_dim, config.rope_theta, short, float(scaling), long_freq, original)

    def cos_sin(
        self, position_ids: torch.Tensor, dtype: torch.dtype, longest: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids: (batch or 1, seq)`` -> cos and sin tables, each ``(batch or 1, seq, 1, head_dim)``.

        Angles are computed in fp32 (fp64 for fp64 inputs) and then cast, which is what Hugging Face does, so
        bf16 runs agree with it. ``longest`` (longrope only): the largest position of the whole sequence,
        default ``position_ids.max()``; pass it where ``position_ids`` are one shard of the sequence.
        """
        compute = torch.promote_types(dtype, torch.float32)
        device = position_ids.device
        if self.inv_freq is None:
            exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.int64).to(compute) / self.head_dim
            inv_freq = 1.0 / (self.theta**exponent)
        else:
            inv_freq = torch.tensor(self.inv_freq, device=device, dtype=compute)
        if self.long_inv_freq is not None:
            # transformers picks the long frequencies for the whole batch when max(position) + 1 > original_max.
            longest = position_ids.max() if longest is None else longest
            long_freq = torch.tensor(self.long_inv_freq, device=device, dtype=compute)
            inv_freq = torch.where(torch.as_tensor(longest, device=device) + 1 > self.original_max, long_freq, inv_freq)
        freqs = position_ids.to(compute)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _floats(t: torch.Tensor, head_dim: int) -> tuple[float, ...]:
    if tuple(t.shape) != (head_dim // 2,):
        raise ValueError(f"transformers gave RoPE frequencies of shape {tuple(t.shape)}, expected ({head_dim // 2},)")
    return tuple(float(f) for f in t.double())


def _transformers_init(config):
    """(transformers' init function for the scaling, a transformers config carrying what it reads)."""
    try:
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError as e:
        raise ImportError(f"rope_type={config.rope_type!r} needs transformers (its RoPE init functions)") from e
    params = {**config.rope_scaling, "rope_theta": config.rope_theta}
    longest = config.max_position_embeddings
    extra = {} if longest is None else {"max_position_embeddings": longest}
    try:
        hf_config = LlamaConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            rope_parameters=params,
            **extra,
        )
        init = ROPE_INIT_FUNCTIONS[config.rope_type]
        init(hf_config, None)  # raises on missing parameters
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"rope_scaling={config.rope_scaling}: transformers rejects it: {e}") from e
    if getattr(hf_config, "rope_parameters", None) is None:
        import transformers

        raise ImportError(f"rope scaling needs transformers >= 5 (rope_parameters); found {transformers.__version__}")
    return init, hf_config


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: (batch, seq, heads, head_dim)`` by tables from :meth:`RopeFrequencies.cos_sin`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    rope: RopeFrequencies,
    longest: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on ``q: (B, L, Hq, D)`` and ``k: (B, L, Hkv, D)`` at ``position_ids: (B or 1, L)``."""
    cos, sin = rope.cos_sin(position_ids, q.dtype, longest)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
