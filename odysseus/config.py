"""Shape and hyper-parameters of one Llama-style Transformer block."""

from __future__ import annotations

import math
from dataclasses import dataclass

# RoPE scalings whose frequencies transformers' RoPE init functions compute once, for training. "dynamic" NTK
# is refused: its frequencies change with the longest sequence the model has seen so far (inference-time
# extrapolation), which a layer split over ranks cannot reproduce.
ROPE_SCALINGS = ("linear", "llama3", "yarn", "longrope")


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
    """Width of one head; defaults to ``hidden_size // num_heads``. Any even width works: the projections are
    ``num_heads * head_dim`` wide, which need not equal ``hidden_size``."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm's square root."""
    causal: bool = True
    """Causal (decoder) attention mask."""
    rope_scaling: dict | None = None
    """RoPE scaling in transformers' ``rope_parameters`` form without ``rope_theta``, e.g. ``{"rope_type":
    "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``; ``rope_type`` one of :data:`ROPE_SCALINGS`. The frequencies
    and the attention scaling come from ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (so scaling
    needs ``transformers >= 5``). ``None`` (or ``rope_type "default"``): plain RoPE, no transformers needed."""
    max_position_embeddings: int | None = None
    """The model's ``max_position_embeddings``; read by yarn and longrope scaling (as in transformers)."""
    qkv_bias: bool = False
    """q_proj, k_proj and v_proj carry biases (Qwen2; Llama's ``attention_bias``)."""
    o_bias: bool = False
    """o_proj carries a bias (Llama's ``attention_bias``)."""
    mlp_bias: bool = False
    """gate_proj, up_proj and down_proj carry biases (Llama's ``mlp_bias``)."""
    sliding_window: int | None = None
    """Sliding-window attention span (Mistral, Qwen2): token i sees tokens j with ``i - j < sliding_window``.
    Windowed attention is not implemented: a forward whose sequence is longer than the window raises
    ``ValueError`` (on every rank), since a window that covers the sequence changes nothing."""

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
        for name in ("causal", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        for name in ("max_position_embeddings", "sliding_window"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.rope_theta)
        if self.rope_scaling is not None:
            from .ops.rope import RopeFrequencies  # imports torch and transformers: only for scaled RoPE

            RopeFrequencies.of(self)  # transformers validates the parameters; its error names the bad ones

    @property
    def q_per_kv(self) -> int:
        """Query heads served by one kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def rope_type(self) -> str:
        """``"default"`` or the scaling's ``rope_type``."""
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @classmethod
    def from_hf(cls, hf_config, layer_idx: int | None = None) -> TransformerConfig:
        """Build from a ``transformers`` Llama, Qwen2 or Mistral config (only public config fields are read).

        ``layer_idx``: the decoder layer the config is for; it matters only for the sliding window, which Qwen2
        applies to the layers its ``layer_types`` name ``"sliding_attention"`` and Mistral to every layer.
        """
        theta, scaling = _hf_rope(hf_config)
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None),
            intermediate_size=hf_config.intermediate_size,
            rope_theta=theta,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_scaling=scaling,
            # Only scaled RoPE reads it; left out otherwise, so that equal blocks have equal configs.
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", None) if scaling else None,
            # Qwen2's q/k/v biases are fixed by its modeling code, not by a config field.
            qkv_bias=attention_bias or getattr(hf_config, "model_type", None) in QKV_BIAS_MODELS,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            sliding_window=_hf_window(hf_config, layer_idx),
        )


QKV_BIAS_MODELS = ("qwen2",)
"""transformers model types whose q/k/v projections always carry biases (and o_proj none)."""


def _normalize_rope_scaling(scaling, theta: float) -> dict | None:
    """Copy of ``scaling`` with ``rope_type`` (4.x configs say ``type``) and no ``rope_theta``; None for plain RoPE."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r} must be a dict (transformers' rope_parameters) or None")
    out = dict(scaling)
    rope_type = out.pop("type", None)
    rope_type = out.setdefault("rope_type", rope_type or "default")
    given_theta = out.pop("rope_theta", theta)
    if not math.isclose(float(given_theta), float(theta)):
        raise ValueError(f"rope_scaling has rope_theta={given_theta} but rope_theta={theta}; give one value")
    if out.get("partial_rotary_factor", 1.0) != 1.0:
        factor = out["partial_rotary_factor"]
        raise ValueError(f"partial_rotary_factor={factor}; only 1.0 (RoPE on every dim) is supported")
    out.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALINGS:
        why = " (its frequencies change with the longest sequence seen so far)" if rope_type == "dynamic" else ""
        raise ValueError(f"rope_type={rope_type!r}{why} is not supported; expected 'default' or one of {ROPE_SCALINGS}")
    return out


def _hf_rope(hf_config) -> tuple[float, dict | None]:
    """(rope_theta, scaling) of a transformers config: 5.x keeps both in ``rope_parameters``, 4.x has
    ``rope_theta`` and ``rope_scaling``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    params.pop("rope_theta", None)
    plain = params.get("rope_type", params.get("type", "default")) == "default" and len(params) <= 1
    return float(theta), None if plain else params


def _hf_window(hf_config, layer_idx: int | None) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    types = getattr(hf_config, "layer_types", None)
    if window is None or not types:
        return window
    if layer_idx is None:
        return window if "sliding_attention" in types else None
    return window if types[layer_idx] == "sliding_attention" else None


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
