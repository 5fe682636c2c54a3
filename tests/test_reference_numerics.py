"""The reference block against an fp64 computation written out plainly, and against transformers' Llama."""

import math

import pytest
import torch
from helpers import EVEN, ODD, assert_close, make_block
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from odysseus import TransformerConfig


def plain_block(x, p, cfg: TransformerConfig, pos):
    """Llama block written from the equations, with complex-number RoPE; shares no code with odysseus."""
    B, L, d = x.shape
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def norm(t, w):
        return w * t / torch.sqrt((t * t).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(t):  # t: (B, L, heads, hd); pairs (j, j + hd/2) rotate by pos * theta^(-2j/hd)
        half = hd // 2
        ang = pos[:, :, None, None].double() * cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        z = torch.complex(t[..., :half], t[..., half:]) * torch.polar(torch.ones_like(ang), ang)
        return torch.cat([z.real, z.imag], dim=-1)

    h = norm(x, p["input_layernorm.weight"])
    q = rope((h @ p["self_attn.q_proj.weight"].T).view(B, L, H, hd))
    k = rope((h @ p["self_attn.k_proj.weight"].T).view(B, L, KV, hd))
    v = (h @ p["self_attn.v_proj.weight"].T).view(B, L, KV, hd)
    out = torch.empty(B, L, H, hd, dtype=x.dtype)
    for head in range(H):
        kvh = head // (H // KV)
        s = q[:, :, head] @ k[:, :, kvh].transpose(1, 2) / math.sqrt(hd)
        if cfg.causal:
            s = s + torch.full((L, L), float("-inf"), dtype=x.dtype).triu(1)
        out[:, :, head] = torch.softmax(s, dim=-1) @ v[:, :, kvh]
    hid = x + out.reshape(B, L, H * hd) @ p["self_attn.o_proj.weight"].T
    g = norm(hid, p["post_attention_layernorm.weight"])
    a = g @ p["mlp.gate_proj.weight"].T
    ffn = (a * torch.sigmoid(a) * (g @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
    return hid + ffn


@pytest.mark.parametrize("shape", [ODD, EVEN], ids=["odd", "even"])
@pytest.mark.parametrize("given_pos", [False, True])
def test_reference_matches_plain_fp64_numerics(shape, given_pos):
    block = make_block(torch.float64, **shape)
    B, L = 2, 61
    x = torch.randn(B, L, block.config.hidden_size, dtype=torch.float64, requires_grad=True)
    # Given positions only move RoPE here: none is 0 (a 0 after a row's first token starts a packed document).
    pos = torch.randint(1, 4000, (B, L)) if given_pos else torch.arange(L)[None].expand(B, L)
    y = block(x, pos if given_pos else None)
    params = {k: v.detach().clone().requires_grad_() for k, v in block.state_dict().items()}
    x2 = x.detach().clone().requires_grad_()
    y2 = plain_block(x2, params, block.config, pos)
    assert_close(y, y2, 1e-10, 1e-12, "output")
    gy = torch.randn_like(y)
    y.backward(gy)
    y2.backward(gy)
    assert_close(x.grad, x2.grad, 1e-9, 1e-12, "x.grad")
    for name, p in block.named_parameters():
        assert_close(p.grad, params[name].grad, 1e-9, 1e-12, f"{name}.grad")


def hf_config(c: TransformerConfig) -> LlamaConfig:
    """The transformers LlamaConfig of the same block (eager attention, no biases)."""
    return LlamaConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )


def test_reference_matches_transformers_llama_numerics():
    block = make_block(torch.float32, **ODD)
    c = block.config
    hf_cfg = hf_config(c)
    assert TransformerConfig.from_hf(hf_cfg) == c
    hf = LlamaDecoderLayer(hf_cfg, layer_idx=0)
    hf.load_state_dict(block.state_dict(), strict=True)
    B, L = 2, 61
    x = torch.randn(B, L, c.hidden_size, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_()
    pos = torch.arange(L)[None].expand(B, L)
    cos_sin = LlamaRotaryEmbedding(hf_cfg)(x_hf, pos)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    y_hf = hf(x_hf, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf
    y = block(x)
    assert_close(y, y_hf, 1e-5, 1e-6, "output vs LlamaDecoderLayer")
    gy = torch.randn_like(y)
    y.backward(gy)
    y_hf.backward(gy)
    assert_close(x.grad, x_hf.grad, 1e-5, 1e-6, "x.grad")
    hf_params = dict(hf.named_parameters())
    for name, p in block.named_parameters():
        assert_close(p.grad, hf_params[name].grad, 1e-4, 1e-6, f"{name}.grad")


def test_state_dict_loads_into_hf_layout_both_ways():
    block = make_block(**ODD)
    hf = LlamaDecoderLayer(hf_config(block.config), layer_idx=0)
    hf.load_state_dict(block.state_dict(), strict=True)
    block2 = make_block(seed=1, **ODD)
    block2.load_state_dict(hf.state_dict(), strict=True)
    for k, v in block.state_dict().items():
        assert torch.equal(v, block2.state_dict()[k]), k
