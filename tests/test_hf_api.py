"""parallelize_llama's contract: what it accepts, what it refuses, and the message it refuses with."""

import copy

import pytest
import torch
from helpers import assert_close
from multirank import RankError, run_ranks
from test_hf_numerics import TOL, batch, tiny_llama
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel

from odysseus import CommLedger, gather_sequence, shard_sequence
from odysseus.integrations.hf import (
    ParallelLlamaDecoderLayer,
    causal_lm_loss,
    check_llama_config,
    finalize_model_grads,
    hf_state_dict,
    parallelize_llama,
)

SIZES = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=160)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "rope_type='dynamic'"),
        (
            "rope_parameters",
            {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "partial_rotary_factor=0.5",
        ),
        ("hidden_act", "gelu", "hidden_act='gelu'; expected 'silu'"),
        ("attention_dropout", 0.1, "attention_dropout=0.1; expected 0.0"),
        ("pretraining_tp", 2, "pretraining_tp=2; expected 1"),
    ],
)
def test_unsupported_config_is_refused(field, value, message):
    config = LlamaConfig(**SIZES, **{field: value})
    with pytest.raises(ValueError, match="cannot run this LlamaConfig") as err:
        check_llama_config(config)
    assert message in str(err.value)


def test_config_fields_are_carried_over():
    config = LlamaConfig(**SIZES, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    c = check_llama_config(config)
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (96, 6, 2, 16)
    assert (c.intermediate_size, c.rope_theta, c.rms_norm_eps) == (160, 5e5, 1e-5)


def test_layers_are_replaced_in_place_under_the_same_names():
    model = tiny_llama()
    names = sorted(n for n, _ in model.named_parameters())
    out = parallelize_llama(model, "odysseus")
    assert out is model
    assert all(isinstance(layer, ParallelLlamaDecoderLayer) for layer in model.model.layers)
    assert sorted(n for n, _ in model.named_parameters()) == names


def test_bad_models_and_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown strategy 'megatron'"):
        parallelize_llama(tiny_llama(), "megatron")
    with pytest.raises(TypeError, match=r"holds no transformers decoder layer \(LlamaDecoderLayer, Qwen2Decoder"):
        parallelize_llama(nn.Sequential(nn.Linear(4, 4)), "tp")
    with pytest.raises(TypeError, match="not a single layer"):
        parallelize_llama(tiny_llama().model.layers[0], "tp")
    model = parallelize_llama(tiny_llama(), "tp")
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize_llama(model, "tp")
    checkpointed = tiny_llama()
    checkpointed.activation_checkpointing_enable()
    with pytest.raises(ValueError, match=r"activation_checkpointing_disable\(\)\) and pass checkpoint=True"):
        parallelize_llama(checkpointed, "tp")


def test_calls_the_layers_cannot_honour_are_refused():
    model = parallelize_llama(tiny_llama(), "odysseus")
    ids, _ = batch()
    with pytest.raises(ValueError, match="use_cache=True; expected False"):
        model(ids, use_cache=True)
    with pytest.raises(ValueError, match="no KV cache"):
        model(ids, cache=DynamicCache(config=model.config))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="3 masked"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="max_length_q was passed"):
        model(ids, position_ids=torch.arange(ids.shape[1])[None], max_length_q=61)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        model(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="use_cache=True; expected False"):
        model.model.layers[0](torch.zeros(1, 5, 96), use_cache=True)


def _eval_mode(rank, world):
    # LlamaConfig defaults to use_cache=True, which in eval mode would make LlamaModel build a cache.
    ref = tiny_llama().eval()
    model = parallelize_llama(tiny_llama(), "ulysses").eval()
    ids, _ = batch()
    local = shard_sequence(ids)
    with torch.no_grad(), CommLedger() as ledger:
        plain = model(local).logits
        masked = model(local, attention_mask=torch.ones_like(local)).logits
        expected = ref(ids).logits
    assert torch.equal(plain, masked)
    assert_close(gather_sequence(plain), expected, **TOL, what="ulysses eval logits")
    # 2 calls x 2 layers x 4 all-to-alls (q, k, v, output): the layers really ran split over the ranks.
    assert ledger.count("op", category="activation") == {"all_to_all": 16}
    return True


def test_eval_mode_and_all_ones_mask_match_the_plain_call():
    assert all(run_ranks(3, _eval_mode))


def _model_without_head(rank, world):
    config = LlamaConfig(**SIZES, num_hidden_layers=2, vocab_size=128, attn_implementation="eager")
    torch.manual_seed(0)
    ref = LlamaModel(config)
    model = parallelize_llama(copy.deepcopy(ref), "tp-sp")
    ids, _ = batch()
    g = torch.randn(*ids.shape, 96, generator=torch.Generator().manual_seed(2))
    ref_out = ref(ids).last_hidden_state
    (ref_out * g).sum().backward()
    out = model(shard_sequence(ids)).last_hidden_state
    (out * shard_sequence(g)).sum().backward()  # global loss = sum of the ranks' local losses
    finalize_model_grads(model)
    assert_close(gather_sequence(out.detach()), ref_out, **TOL, what="tp-sp last_hidden_state")
    grads = hf_state_dict(model, grad=True)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, **TOL, what=f"tp-sp {name}.grad")
    return True


def test_llama_model_without_head_is_parallelized():
    assert all(run_ranks(3, _model_without_head))


def _tp_labels(rank, world):
    ref, model = tiny_llama(), parallelize_llama(tiny_llama(), "tp")
    assert model.model.layers[0].self_attn.q_proj.weight.shape[0] == 2 * 16  # this rank's 2 of 6 heads
    ids, labels = batch()
    want = ref(ids, labels=labels).loss
    want.backward()
    loss = model(ids, labels=labels).loss
    assert_close(loss, want, **TOL, what="tp Hugging Face loss")
    assert_close(causal_lm_loss(model(ids).logits, labels), want, **TOL, what="tp causal_lm_loss")
    loss.backward()  # TP: every rank computes the whole (replicated) loss
    finalize_model_grads(model)
    grads = hf_state_dict(model, grad=True)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, **TOL, what=f"tp {name}.grad")
    return True


def test_tp_keeps_hugging_face_labels():
    assert all(run_ranks(3, _tp_labels))


def _labels_refused(rank, world):
    model = parallelize_llama(tiny_llama(), "odysseus")
    ids, labels = batch()
    try:
        model(shard_sequence(ids), labels=shard_sequence(labels))
    except ValueError as e:
        assert "causal_lm_loss" in str(e), str(e)
    else:
        raise AssertionError("labels were accepted by a sequence-split model")
    logits = model(shard_sequence(ids)).logits
    if rank == 0:  # the loss is local: one rank alone can be wrong
        causal_lm_loss(logits[:, :-1], labels)


def test_sequence_split_labels_and_misaligned_logits_are_refused():
    with pytest.raises(RankError, match=r"logits hold 30 tokens; .* rank 0 expects its shard of 31 tokens"):
        run_ranks(2, _labels_refused)


def _ledger(rank, world, strategy):
    model = parallelize_llama(tiny_llama(), strategy)
    ids, labels = batch()
    causal_lm_loss(model(ids if strategy == "tp" else shard_sequence(ids)).logits, labels).backward()
    with CommLedger() as ledger:
        finalize_model_grads(model)
    return [(r.op, r.phase, r.category, r.bytes_received) for r in ledger.select(label="model grads")]


@pytest.mark.parametrize("strategy", ["tp", "ulysses"])
def test_model_grad_sync_is_recorded_by_the_ledger(strategy):
    records = run_ranks(2, _ledger, strategy)[0]
    if strategy == "tp":
        assert records == []  # every rank saw the whole sequence: nothing to sum
    else:
        # embed_tokens (128 x 96) + final norm (96) + lm_head (128 x 96), fp32, one bucket; at world 2 an
        # all-reduce receives what it sends: numel * 4 bytes.
        assert records == [("all_reduce", "backward", "gradient", (2 * 128 * 96 + 96) * 4)]
