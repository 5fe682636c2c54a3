"""parallelize_llama on a transformers LlamaForCausalLM against the same model unsplit: logits, loss, every gradient."""

import copy

import pytest
import torch
from helpers import assert_close
from multirank import run_ranks
from transformers import LlamaConfig, LlamaForCausalLM

from odysseus import STRATEGIES, gather_sequence, shard_sequence
from odysseus.integrations.hf import (
    causal_lm_loss,
    finalize_model_grads,
    global_loss,
    hf_state_dict,
    parallelize_llama,
    shift_labels_for_shard,
)

TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """GQA Llama where nothing divides evenly; norms perturbed so that their gradients are not symmetric."""
    config = LlamaConfig(
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=128,
        intermediate_size=160,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(B: int = 2, L: int = 61) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (with some ignored positions, one of them at a shard boundary at every world size)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (B, L), generator=g)
    labels = ids.clone()
    labels[0, 7:12] = -100
    labels[1, 31] = -100
    return ids, labels


def _parity(rank, world, strategy, tie, group_kind):
    ref = tiny_llama(tie)
    model = copy.deepcopy(ref)
    group = None
    if group_kind == "mesh":
        from torch.distributed.device_mesh import init_device_mesh

        group = init_device_mesh("cpu", (world,), mesh_dim_names=("sp",))
    assert parallelize_llama(model, strategy, group) is model
    ids, labels = batch()
    out_ref = ref(ids, labels=labels)
    out_ref.loss.backward()

    logits = model(ids if strategy == "tp" else shard_sequence(ids)).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    finalize_model_grads(model)

    full = logits.detach() if strategy == "tp" else gather_sequence(logits.detach())
    assert_close(full, out_ref.logits, **TOL, what=f"{strategy} logits")
    assert_close(global_loss(loss, model), out_ref.loss, **TOL, what=f"{strategy} loss")
    grads = hf_state_dict(model, grad=True)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, **TOL, what=f"{strategy} {name}.grad")

    # The dense state dict loads into a fresh transformers model, which then computes what the original does.
    weights = hf_state_dict(model)
    assert set(weights) == set(ref.state_dict())
    fresh = tiny_llama(tie, seed=1)
    fresh.load_state_dict(weights)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref(ids).logits)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_llama_parity_numerics(strategy, world):
    assert all(run_ranks(world, _parity, strategy, False, "pg"))


@pytest.mark.parametrize("strategy", ["tp", "odysseus"])
def test_llama_tied_embeddings_parity_numerics(strategy):
    assert all(run_ranks(3, _parity, strategy, True, "pg"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_llama_device_mesh_parity_numerics(strategy):
    assert all(run_ranks(2, _parity, strategy, False, "mesh"))


def _shift(rank, world):
    labels = torch.arange(7)[None].repeat(2, 1)
    return shift_labels_for_shard(labels), labels.shape


def test_shift_labels_cross_shard_boundaries_numerics():
    got = [t for t, _ in run_ranks(3, _shift)]
    # 7 tokens over 3 ranks: shards of 3, 2, 2; each shard's last target is the next shard's first token.
    expected = [[1, 2, 3], [4, 5], [6, -100]]
    for rank, (t, want) in enumerate(zip(got, expected)):
        assert t.tolist() == [want, want], f"rank {rank}: {t.tolist()}"
