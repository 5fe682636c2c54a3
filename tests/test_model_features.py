"""Model features beyond plain Llama, at the module level: q/k/v, o and MLP biases, head_dim != hidden/heads,
RoPE scaling (linear, llama3, yarn, longrope) and a sliding window. The reference block against transformers'
own layer; every strategy (and overlap backend) against the reference at worlds 1-4; ZeRO-3, fresh weights
and bad weights with biases; the config's validation."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import ODD, assert_close, local_input, make_block
from multirank import run_ranks
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import odysseus
from odysseus import (
    STRATEGIES,
    ParallelBlock,
    TransformerConfig,
    dense_state_dict,
    finalize_grads,
    gather_sequence,
    shard_sequence,
)
from odysseus.ops.rope import RopeFrequencies
from odysseus.reference import TransformerBlock, init_weights

TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)
BIASES = dict(qkv_bias=True, o_bias=True, mlp_bias=True)
# Small original lengths, so that a 61-token sequence reaches every regime of each scaling.
ROPES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "llama3": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=8.0),
    "longrope": dict(
        rope_type="longrope",
        short_factor=[1.0 + 0.25 * i for i in range(8)],  # head_dim 16: one factor per frequency
        long_factor=[2.0 + i for i in range(8)],
        original_max_position_embeddings=32,
    ),
}
# Every feature at once: biases everywhere, 24-wide heads on a 96-wide model (q is 144 wide), llama3 RoPE.
EVERYTHING = dict(ODD, head_dim=24, **BIASES, rope_scaling=ROPES["llama3"], max_position_embeddings=64)


def feature_block(dtype=torch.float32, **cfg) -> TransformerBlock:
    """make_block with random (non-zero) biases."""
    block = make_block(dtype, **cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return block


def rope_config(kind: str, **extra) -> dict:
    return dict(ODD, rope_scaling=ROPES[kind], max_position_embeddings=128, **extra)


# --- the reference block against transformers' LlamaDecoderLayer ----------------------------------------------


def hf_layer_config(c: TransformerConfig) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        attention_bias=c.qkv_bias,
        mlp_bias=c.mlp_bias,
        max_position_embeddings=c.max_position_embeddings or 2048,
        rope_parameters={**(c.rope_scaling or {"rope_type": "default"}), "rope_theta": c.rope_theta},
        attn_implementation="eager",
    )


@pytest.mark.parametrize("kind", ["plain", "everything", *ROPES])
def test_reference_matches_transformers_layer_numerics(kind):
    cfg = {"everything": EVERYTHING, "plain": dict(ODD, **BIASES)}.get(kind) or rope_config(kind)
    block = feature_block(**cfg)
    hf_cfg = hf_layer_config(block.config)
    assert TransformerConfig.from_hf(hf_cfg) == block.config
    hf = LlamaDecoderLayer(hf_cfg, layer_idx=0)
    hf.load_state_dict(block.state_dict(), strict=True)
    B, L = 2, 61
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, 96, generator=g, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_()
    pos = torch.arange(L)[None].expand(B, L)
    cos_sin = LlamaRotaryEmbedding(hf_cfg)(x_hf, pos)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    y_hf = hf(x_hf, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    y = block(x)
    assert_close(y, y_hf, **TOL, what=f"{kind}: output vs LlamaDecoderLayer")
    gy = torch.randn(B, L, 96, generator=g)
    y.backward(gy)
    y_hf.backward(gy)
    assert_close(x.grad, x_hf.grad, **TOL, what=f"{kind}: x.grad")
    hf_params = dict(hf.named_parameters())
    assert set(hf_params) == {n for n, _ in block.named_parameters()}
    for name, p in block.named_parameters():
        assert_close(p.grad, hf_params[name].grad, **TOL, what=f"{kind}: {name}.grad")


@pytest.mark.parametrize("positions", ["short", "long"])
@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_tables_equal_transformers(kind, positions):
    """cos/sin from transformers' init functions, scaled as transformers scales them; longrope switches to its
    long factors where the largest position + 1 exceeds original_max_position_embeddings (32)."""
    config = TransformerConfig(**rope_config(kind))
    L = 30 if positions == "short" else 61
    pos = torch.arange(L)[None]
    cos, sin = RopeFrequencies.of(config).cos_sin(pos, torch.float32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_layer_config(config))(torch.zeros(1, L, 96), pos)
    assert_close(cos[:, :, 0], hf_cos, 1e-6, 1e-6, f"{kind} cos")
    assert_close(sin[:, :, 0], hf_sin, 1e-6, 1e-6, f"{kind} sin")
    plain, _ = RopeFrequencies.of(TransformerConfig(**ODD)).cos_sin(pos, torch.float32)
    assert (cos - plain).abs().max() > 1e-2, f"{kind}: the scaled table equals plain RoPE"


# --- every strategy against the reference ---------------------------------------------------------------------


def run_both(ref, par, strategy, B=2, L=61, position_ids=None):
    """Forward+backward of the reference and of the parallel module on the same input; returns
    ((out, x.grad, dense grads) of the parallel module, the same of the reference)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, ref.config.hidden_size, generator=g)
    gy = torch.randn(B, L, ref.config.hidden_size, generator=g)
    xr = x.clone().requires_grad_()
    pos = () if position_ids is None else (position_ids,)  # FFNs take no positions
    y_ref = ref(xr, *pos)
    y_ref.backward(gy)
    xp = x.clone().requires_grad_()
    if strategy == "tp":
        y = par(xp, *pos)
        (y * gy).sum().backward()
        full = y.detach()
    else:
        y = par(shard_sequence(xp), *(shard_sequence(p) for p in pos))
        (y * shard_sequence(gy)).sum().backward()
        full = gather_sequence(y.detach())
    finalize_grads(par)
    ours = (full, xp.grad, dense_state_dict(par, grad=True))
    return ours, (y_ref.detach(), xr.grad, {n: p.grad for n, p in ref.named_parameters()})


def check_same(ours, theirs, what):
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = ours, theirs
    assert_close(y, y_ref, **TOL, what=f"{what}: output")
    assert_close(gx, gx_ref, **TOL, what=f"{what}: x.grad")
    assert set(grads) == set(grads_ref), (sorted(grads), sorted(grads_ref))
    for name, want in grads_ref.items():
        assert_close(grads[name], want, **TOL, what=f"{what}: {name}.grad")


def _block_parity(rank, world, strategy, backend, cfg):
    ref = feature_block(**cfg)
    par = odysseus.parallelize(ref, strategy, backend=backend)
    weights = dense_state_dict(par)
    for name, p in ref.named_parameters():
        assert torch.equal(weights[name], p), f"{strategy}: {name} does not reassemble"
    check_same(*run_both(ref, par, strategy), f"{strategy}/{backend} at world {world}")
    return True


STRATEGY_BACKENDS = [("tp", "auto"), ("ulysses", "auto")] + [
    (s, b) for s in ("tp-sp", "odysseus") for b in ("naive", "pipelined")
]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy, backend", STRATEGY_BACKENDS)
def test_biases_head_dim_llama3_block_parity_numerics(strategy, backend, world):
    assert all(run_ranks(world, _block_parity, strategy, backend, EVERYTHING))


def _modules_parity(rank, world, cfg, position_ids):
    ref = feature_block(**cfg)
    for strategy in STRATEGIES:
        for what in ("block", "attn", "ffn"):
            module = {"block": ref, "attn": ref.self_attn, "ffn": ref.mlp}[what]
            par = odysseus.parallelize(module, strategy)
            module.zero_grad()
            pos = None if what == "ffn" else position_ids
            check_same(*run_both(module, par, strategy, position_ids=pos), f"{strategy} {what}")
    return True


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_scaling_parity_every_strategy_numerics(kind):
    # Uneven position gaps (as after dropping tokens) up to 3000: past every original length above, and, for
    # Ulysses, shards whose own largest position differs from the sequence's (longrope reads the latter).
    g = torch.Generator().manual_seed(5)
    pos = torch.stack([torch.randperm(3000, generator=g)[:61].sort().values + 1 for _ in range(2)])
    assert all(run_ranks(3, _modules_parity, rope_config(kind, **BIASES), pos))


def test_longrope_uses_the_whole_sequence_to_pick_factors_numerics():
    # 61 tokens from position 0 > 32: the long factors; rank 0 of 3 alone holds positions 0..20, which would
    # pick the short ones. Both settings differ from each other (checked in test_rope_tables_equal_transformers).
    assert all(run_ranks(3, _modules_parity, rope_config("longrope"), None))


# --- ZeRO-3, fresh weights, bad weights --------------------------------------------------------------------


def _zero3(rank, world, strategy):
    ref = feature_block(**EVERYTHING)
    par = odysseus.zero3(odysseus.parallelize(ref, strategy))
    g = torch.Generator().manual_seed(3)
    x, gy = torch.randn(2, 61, 96, generator=g), torch.randn(2, 61, 96, generator=g)
    # SGD: an update proportional to the gradient (Adam would blow up rounding in the near-zero k bias grads).
    # lr 0.01 keeps the model from blowing up: at 0.1 the second step's gradients reach 2e5, where fp32
    # rounding of two equally valid orders (the fused SwiGLU's backward against autograd's) differs by 1.2e-5.
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01)
    opt_par = torch.optim.SGD(par.parameters(), lr=0.01)
    for _ in range(2):
        opt_ref.zero_grad()
        ref(x).backward(gy)
        opt_par.zero_grad()
        (par(shard_sequence(x)) * shard_sequence(gy)).sum().backward()
        finalize_grads(par)
        grads = dense_state_dict(par, grad=True)
        for k, p in ref.named_parameters():
            assert_close(grads[k], p.grad, **TOL, what=f"{strategy}+zero3 {k}.grad")
        opt_ref.step()
        opt_par.step()
    weights = dense_state_dict(par)
    for k, p in ref.named_parameters():
        assert_close(weights[k], p, **TOL, what=f"{strategy}+zero3 {k} after 2 steps")
    return sorted(n for n, p in par.named_parameters() if hasattr(p, "placements"))


@pytest.mark.parametrize("strategy", ["tp-sp", "ulysses", "odysseus"])
def test_zero3_with_biases_numerics(strategy):
    sharded = run_ranks(2, _zero3, strategy)[0]
    # The whole-weight modules are sharded with their biases; a row-split layer (o_proj, and down_proj under
    # TP-SP) is never sharded, although its bias is whole on every rank.
    assert ("mlp.down_proj.bias" in sharded) == (strategy != "tp-sp")
    assert ("self_attn.o_proj.bias" in sharded) == (strategy == "ulysses")
    assert "self_attn.o_proj.weight" not in sharded or strategy == "ulysses"


def _fresh(rank, world):
    config = TransformerConfig(**EVERYTHING)
    want = init_weights(TransformerBlock(config), std=0.1, seed=5).state_dict()
    assert all(not want[k].any() for k in want if k.endswith(".bias"))
    for strategy in STRATEGIES:
        block = ParallelBlock(config, strategy, seed=5, std=0.1)
        got = dense_state_dict(block)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{strategy} {k}"
        # A column-split projection's bias is split with its rows; a row-split one's is whole on every rank.
        q, o = block.self_attn.q_proj, block.self_attn.o_proj
        assert q.bias.shape == q.weight.shape[:1] and o.bias.shape == (96,)
    return True


def test_fresh_weights_with_biases_equal_seeded_reference():
    assert all(run_ranks(3, _fresh))


def test_weights_must_hold_a_bias_exactly_where_the_config_has_one():
    ref = feature_block(**dict(ODD, **BIASES))
    state = dict(ref.self_attn.state_dict())
    del state["q_proj.bias"]
    with pytest.raises(ValueError, match="q_proj.bias is missing from the weights but the config has qkv_bias=True"):
        odysseus.OdysseusAttention(ref.config, weights=state)
    plain = TransformerConfig(**ODD)
    with pytest.raises(ValueError, match="gate_proj.bias is in the weights but the config has mlp_bias=False"):
        odysseus.SeqParallelFFN(plain, weights=dict(ref.mlp.state_dict()))
    with pytest.raises(ValueError, match=r"o_proj: dense bias has shape \(95,\), expected \(96,\)"):
        bad = dict(ref.self_attn.state_dict(), **{"o_proj.bias": torch.zeros(95)})
        odysseus.TPAttention(ref.config, weights=bad)


# --- sliding window ---------------------------------------------------------------------------------------------


def _window(rank, world, strategy, window):
    ref = feature_block(**dict(ODD, sliding_window=window))
    par = odysseus.parallelize(ref, strategy)
    x = torch.randn(2, 61, 96)
    try:  # the parallel module alone first: every rank must refuse, none may hang
        par(local_input(strategy, x))
    except ValueError as e:
        return str(e)
    check_same(*run_both(ref, par, strategy), f"{strategy} window {window}")
    return "ok"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sliding_window_must_cover_the_sequence(strategy):
    # A window of 61 covers 61 tokens (token 60 still sees token 0): the block runs and matches the reference.
    assert run_ranks(3, _window, strategy, 61) == ["ok"] * 3
    # 60 does not: every rank refuses, with the same message naming window and length.
    messages = run_ranks(3, _window, strategy, 60)
    assert len(set(messages)) == 1, messages
    assert "Attention: the sequence holds 61 tokens but sliding_window=60" in messages[0]
    assert "length <= 60" in messages[0]


# --- the config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type='dynamic' \(its frequencies change"),
        (dict(rope_scaling={"rope_type": "su"}), r"rope_type='su' is not supported; expected 'default' or one of"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "Missing required keys .*low_freq_factor"),
        (dict(rope_scaling={"rope_type": "linear"}), "transformers rejects it"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}), "partial_rotary"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}), "rope_theta=500.0 but"),
        (dict(rope_scaling="llama3"), "rope_scaling='llama3' must be a dict"),
        (dict(qkv_bias=1), "qkv_bias=1 must be a bool"),
        (dict(sliding_window=0), "sliding_window=0 must be a positive int"),
        (dict(max_position_embeddings=-5), "max_position_embeddings=-5 must be a positive int"),
    ],
)
def test_invalid_feature_config_names_the_value(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        TransformerConfig(**ODD, **kwargs)


def test_rope_scaling_is_normalised():
    # transformers 4.x spelled it "type"; rope_type "default" is plain RoPE.
    a = TransformerConfig(**ODD, rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert a.rope_scaling == {"rope_type": "linear", "factor": 2.0} and a.rope_type == "linear"
    assert TransformerConfig(**ODD, rope_scaling={"rope_type": "default"}).rope_scaling is None


def test_plain_rope_needs_no_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, odysseus\n"
        "from odysseus.reference import TransformerBlock, init_weights\n"
        "c = odysseus.TransformerConfig(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160,"
        " head_dim=24, qkv_bias=True)\n"
        "y = init_weights(TransformerBlock(c))(torch.randn(1, 9, 96), torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]]))\n"
        "assert y.shape == (1, 9, 96)\n"
        "try:\n"
        "    odysseus.TransformerConfig(hidden_size=96, num_heads=6, intermediate_size=160,"
        " rope_scaling={'rope_type': 'linear', 'factor': 2.0})\n"
        "except ImportError as e:\n"
        "    assert 'needs transformers' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('scaled RoPE without transformers')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_from_hf_reads_biases_window_and_rope():
    from transformers import MistralConfig, Qwen2Config

    sizes = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=160)
    qwen = TransformerConfig.from_hf(Qwen2Config(**sizes))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.mlp_bias, qwen.sliding_window) == (True, False, False, None)
    llama = TransformerConfig.from_hf(LlamaConfig(**sizes, attention_bias=True, head_dim=24))
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.head_dim) == (True, True, False, 24)
    mistral = TransformerConfig.from_hf(MistralConfig(**sizes, sliding_window=100))
    assert mistral.sliding_window == 100 and not mistral.qkv_bias
    # Qwen2 windows only the layers from max_window_layers on.
    windowed = Qwen2Config(
        **sizes, num_hidden_layers=3, use_sliding_window=True, sliding_window=50, max_window_layers=1
    )
    assert [TransformerConfig.from_hf(windowed, i).sliding_window for i in range(3)] == [None, 50, 50]
    scaled = TransformerConfig.from_hf(LlamaConfig(**sizes, max_position_embeddings=64, rope_parameters=dict(
        ROPES["llama3"], rope_theta=5e5)))  # fmt: skip
    assert scaled.rope_scaling == ROPES["llama3"] and scaled.rope_theta == 5e5
    assert scaled.max_position_embeddings == 64


def test_window_refusal_is_raised_by_the_reference_too():
    block = feature_block(**dict(ODD, sliding_window=10))
    block(torch.randn(1, 10, 96))
    with pytest.raises(ValueError, match="holds 11 tokens but sliding_window=10"):
        block(torch.randn(1, 11, 96))


def test_copy_keeps_the_rope_tables():
    block = feature_block(**rope_config("yarn"))
    assert copy.deepcopy(block).self_attn.rope == block.self_attn.rope
    assert block.self_attn.rope.attention_scaling > 1.0
