"""Single-device, pure-PyTorch Llama block: the ground truth every strategy is tested against.

Parameter names follow Hugging Face Llama (``self_attn.q_proj``, ``mlp.gate_proj``, ...), so state dicts
load both ways.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .ops.packing import check_window, document_ids, document_mask
from .ops.rope import RopeFrequencies, apply_rope
from .validation import check_input, normalize_position_ids


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, computed in at least fp32 and cast back (as Hugging Face does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., hidden)`` -> same shape."""
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xc.to(x.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention with RoPE (scaled as ``config.rope_scaling`` says); attention scores
    computed explicitly (no fused kernel)."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        c, kw = config, dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, **kw)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, **kw)
        self.rope = RopeFrequencies.of(config)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x: (batch, seq, hidden)``, ``position_ids: (batch or 1, seq)`` or ``(seq,)`` -> ``(batch, seq, hidden)``.

        ``position_ids`` defaults to ``0..seq-1``. They move RoPE, and a position 0 after a row's first token
        starts a new document (packed sequences, :mod:`odysseus.ops.packing`): no token attends across documents.
        Otherwise the causal mask follows token order.
        """
        c = self.config
        check_input(x, self.q_proj.weight, c.hidden_size, "Attention")
        B, L, _ = x.shape
        check_window(c.sliding_window, L, "Attention")
        pos = normalize_position_ids(position_ids, B, L, 0, x.device)
        q = self.q_proj(x).view(B, L, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(B, L, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, L, c.num_kv_heads, c.head_dim)
        cos, sin = self.rope.cos_sin(pos, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(c.q_per_kv, dim=2)
        v = v.repeat_interleave(c.q_per_kv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * c.head_dim**-0.5
        if c.causal:
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        documents = None if position_ids is None else document_ids(pos)
        if documents is not None:
            scores = scores.masked_fill(~document_mask(documents, causal=False), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, L, c.num_heads * c.head_dim)
        return self.o_proj(out)


class FFN(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        d, i, kw = config.hidden_size, config.intermediate_size, dict(bias=config.mlp_bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(d, i, **kw)
        self.up_proj = nn.Linear(d, i, **kw)
        self.down_proj = nn.Linear(i, d, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (batch, seq, hidden)`` -> ``(batch, seq, hidden)``."""
        check_input(x, self.gate_proj.weight, self.config.hidden_size, "FFN")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: ``h = x + attn(norm(x))``, ``y = h + ffn(norm(h))``."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = FFN(config, device, dtype)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x: (batch, seq, hidden)`` -> ``(batch, seq, hidden)``."""
        check_input(x, self.input_layernorm.weight, self.config.hidden_size, "TransformerBlock")
        h = x + self.self_attn(self.input_layernorm(x), position_ids)
        return h + self.mlp(self.post_attention_layernorm(h))


def seeded_normal(name: str, shape: tuple[int, ...], seed: int = 0, std: float = 0.02) -> torch.Tensor:
    """N(0, std) weights for the linear layer ``name`` (``q_proj``, ``down_proj``, ...), on the CPU in fp32.

    Keyed by (seed, name) so that a parallel module can draw the dense weight of any layer and keep its slice.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * std


def init_weights(module: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Llama's initialisation: linear weights N(0, std) (see :func:`seeded_normal`), biases zero, norm weights one."""
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                leaf = name.rsplit(".", 1)[-1]
                m.weight.copy_(seeded_normal(leaf, tuple(m.weight.shape), seed, std))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
    return module
