"""parallelize_llama on the HF families it accepts, against the same model unsplit: logits, loss and every gradient
at worlds 1-4 for every strategy, and the checkpoint it writes back.

- Llama with llama3 RoPE, attention and MLP biases, and 24-wide heads on a 96-wide model;
- Qwen2 (q/k/v biases, no o_proj bias) with yarn RoPE;
- Mistral with a sliding window exactly as long as the sequence, and linear RoPE;
- Llama with longrope, whose factors switch with the longest position of the whole batch;
- sliding windows shorter than the sequence, refused at forward time on every rank alike.
"""

import copy

import pytest
import torch
from helpers import assert_close
from multirank import run_ranks
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from odysseus import STRATEGIES, gather_sequence, shard_sequence
from odysseus.integrations.hf import (
    causal_lm_loss,
    check_llama_config,
    finalize_model_grads,
    global_loss,
    hf_state_dict,
    parallelize_llama,
)

TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)
SIZES = dict(
    hidden_size=96,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=160,
    num_hidden_layers=2,
    vocab_size=128,
    attn_implementation="eager",
)
LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    short_factor=[1.0 + 0.25 * i for i in range(8)],
    long_factor=[2.0 + i for i in range(8)],
)


def family_config(family: str, **overrides):
    """A small config of ``family`` in which nothing divides evenly over 2, 3 or 4 ranks."""
    if family == "llama":
        rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        rope.update(original_max_position_embeddings=16, rope_theta=10000.0)
        kw = dict(head_dim=24, attention_bias=True, mlp_bias=True, rope_parameters=rope)
        return LlamaConfig(**{**SIZES, **kw, **overrides})
    if family == "qwen2":
        rope = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0)
        return Qwen2Config(**{**SIZES, "max_position_embeddings": 64, "rope_parameters": rope, **overrides})
    if family == "mistral":
        rope = dict(rope_type="linear", factor=2.0, rope_theta=10000.0)
        return MistralConfig(**{**SIZES, "sliding_window": 61, "rope_parameters": rope, **overrides})
    if family.startswith("longrope"):
        original = {"longrope-short": 64, "longrope-packed": 40}.get(family, 32)
        rope = dict(LONGROPE, original_max_position_embeddings=original)
        return LlamaConfig(**{**SIZES, "max_position_embeddings": 128, "rope_parameters": rope, **overrides})
    raise ValueError(family)


def build(config, seed: int = 0):
    """The model class of ``config`` in fp64, with perturbed norms and random biases (fresh ones are 0 or 1).

    fp64: biases make some gradients sums of cancelling terms (q_proj's ~1e-6 of the largest), whose fp32
    rounding alone breaks a 1e-5 bound; transformers still takes RoPE angles in fp32, which both sides see.
    """
    cls = {LlamaConfig: LlamaForCausalLM, Qwen2Config: Qwen2ForCausalLM, MistralConfig: MistralForCausalLM}
    torch.manual_seed(seed)
    model = cls[type(config)](config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def batch(B: int = 2, L: int = 61):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (B, L), generator=g)
    labels = ids.clone()
    labels[0, 7:12] = -100
    labels[1, 31] = -100
    return ids, labels


def check_parity(ref, model, strategy, ids, labels, position_ids=None, truth=None):
    """Loss backward on both; logits, loss and every gradient compared. ``truth``: (logits, loss) computed
    otherwise for ``ref`` (its gradients must be in place); default: ``ref(ids, labels=labels)``."""
    if truth is None:
        out = ref(ids, labels=labels, position_ids=position_ids, use_cache=False)
        out.loss.backward()
        truth = out.logits.detach(), out.loss.detach()
    split = (lambda t: t) if strategy == "tp" else shard_sequence
    kwargs = {} if position_ids is None else {"position_ids": split(position_ids)}
    logits = model(split(ids), **kwargs).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    finalize_model_grads(model)
    full = logits.detach() if strategy == "tp" else gather_sequence(logits.detach())
    assert_close(full, truth[0], **TOL, what=f"{strategy} logits")
    assert_close(global_loss(loss, model), truth[1], **TOL, what=f"{strategy} loss")
    grads = hf_state_dict(model, grad=True)
    assert set(grads) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, **TOL, what=f"{strategy} {name}.grad")


def _family(rank, world, family):
    config = family_config(family)
    ids, labels = batch()
    for strategy in STRATEGIES:
        ref = build(config)
        model = parallelize_llama(copy.deepcopy(ref), strategy)
        check_parity(ref, model, strategy, ids, labels)
        # The whole state, biases included, loads into a fresh model of the family, which computes the same.
        fresh = build(config, seed=1)
        fresh.load_state_dict(hf_state_dict(model))
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, ref(ids).logits), f"{strategy}: state does not round-trip"
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_family_parity_numerics(family, world):
    assert all(run_ranks(world, _family, family))


def _longrope(rank, world, family):
    config = family_config(family)
    ids, labels = batch()
    for strategy in STRATEGIES:
        ref = build(config)
        check_parity(ref, parallelize_llama(copy.deepcopy(ref), strategy), strategy, ids, labels)
    return True


@pytest.mark.parametrize("family", ["longrope-long", "longrope-short"])
def test_longrope_parity_numerics(family):
    # 61 tokens: past original_max_position_embeddings=32 (long factors), within 64 (short ones). At world 3
    # rank 0 holds positions 0..20, so a rank that judged by its own shard would pick the wrong factors.
    assert all(run_ranks(3, _longrope, family))


def _window(rank, world, strategy, family, window):
    overrides = {"sliding_window": window}
    if family == "qwen2":  # Qwen2 windows only the layers from max_window_layers on: here the second
        overrides.update(use_sliding_window=True, max_window_layers=1)
    model = parallelize_llama(build(family_config(family, **overrides)), strategy)
    ids, _ = batch()
    try:
        model(ids if strategy == "tp" else shard_sequence(ids))
    except ValueError as e:
        return str(e)
    return "ran"


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_window_shorter_than_the_sequence_is_refused_on_every_rank(strategy, family):
    messages = run_ranks(3, _window, strategy, family, 60)
    assert len(set(messages)) == 1, messages  # the same error on every rank, none left waiting
    assert "the sequence holds 61 tokens but sliding_window=60" in messages[0], messages[0]


def test_qwen2_window_applies_only_to_its_sliding_layers():
    model = parallelize_llama(
        build(family_config("qwen2", use_sliding_window=True, sliding_window=40, max_window_layers=1)), "tp"
    )
    assert [layer.config.sliding_window for layer in model.model.layers] == [None, 40]


def test_config_checks_name_what_stays_unsupported():
    for field, value, message in [
        ("rope_parameters", dict(rope_type="dynamic", factor=2.0, rope_theta=1e4), "rope_type='dynamic'"),
        ("hidden_act", "gelu", "hidden_act='gelu'; expected 'silu'"),
        ("attention_dropout", 0.1, "attention_dropout=0.1; expected 0.0"),
    ]:
        with pytest.raises(ValueError, match="parallelize_llama cannot run this Qwen2Config") as err:
            check_llama_config(family_config("qwen2", **{field: value}))
        assert message in str(err.value)


def test_layer_weights_must_match_the_config_biases():
    model = build(family_config("qwen2"))
    model.model.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(96))
    with pytest.raises(ValueError, match=r"model.layers.1 holds weights .*'self_attn.o_proj.bias'"):
        parallelize_llama(model, "tp")
