"""Shape and hyper-parameters of one Llama-style Transformer block."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TransformerConfig:
    """A Llama-style block: RMSNorm, GQA attention with RoPE, SwiGLU FFN.

    Sizes are validated on construction; a bad value raises ``ValueError`` naming it.
    """

    hidden_size: int
    """Model width d."""
    num_heads: int
    """Number of query heads."""
    intermediate_size: int
    """FFN width i (gate/up project d -> i, down projects i -> d)."""
    num_kv_heads: int | None = None
    """Number of key/value heads (GQA); defaults to ``num_heads`` (plain multi-head attention)."""
    head_dim: int | None = None
    """Width of one head; defaults to ``hidden_size // num_heads``."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm's square root."""
    causal: bool = True
    """Causal (decoder) attention mask."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for name in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
            _require_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "pass head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        _require_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}; "
                "GQA needs every kv head to serve the same number of query heads"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be >= 0")

    @property
    def q_per_kv(self) -> int:
        """Query heads served by one kv head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf_config) -> TransformerConfig:
        """Build from a ``transformers`` ``LlamaConfig`` (only public config fields are read)."""
        return cls(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None),
            intermediate_size=hf_config.intermediate_size,
            rope_theta=_hf_rope_theta(hf_config),
            rms_norm_eps=hf_config.rms_norm_eps,
        )


def _hf_rope_theta(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        # transformers >= 5 keeps it in rope_parameters.
        params = getattr(hf_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
