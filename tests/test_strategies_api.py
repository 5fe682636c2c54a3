"""Construction, groups and bad input of the strategy modules."""

import pytest
import torch
from helpers import ODD, assert_close, make_block
from multirank import run_ranks
from torch import nn

import odysseus
from odysseus import STRATEGIES, ParallelBlock, TransformerConfig, dense_state_dict, shard_sequence
from odysseus.reference import FFN, Attention, TransformerBlock, init_weights

CFG = TransformerConfig(**ODD)


def _fresh(rank, world):
    """Building from a config draws the same weights as init_weights on the dense reference."""
    for strategy in STRATEGIES:
        block = ParallelBlock(CFG, strategy, seed=5, std=0.1)
        want = init_weights(TransformerBlock(CFG), std=0.1, seed=5).state_dict()
        got = dense_state_dict(block)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{strategy} {k}"
    for cls, ref_cls in [
        (odysseus.OdysseusAttention, Attention),
        (odysseus.UlyssesAttention, Attention),
        (odysseus.TPAttention, Attention),
        (odysseus.TPSPFFN, FFN),
        (odysseus.SeqParallelFFN, FFN),
    ]:
        got = dense_state_dict(cls(CFG, seed=2))
        want = init_weights(ref_cls(CFG), seed=2).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), cls.__name__
    return True


def test_fresh_init_equals_seeded_reference():
    assert all(run_ranks(3, _fresh))


def _mesh(rank, world, strategy):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    ref = make_block(**ODD)
    x = torch.randn(2, 61, 96, generator=torch.Generator().manual_seed(0))
    a = odysseus.parallelize(ref, strategy, group=mesh)
    b = odysseus.parallelize(ref, strategy)
    xin = x if strategy == "tp" else shard_sequence(x, mesh)
    assert_close(a(xin), b(xin), 0, 0, f"{strategy}: DeviceMesh vs default group")
    with pytest.raises(ValueError, match="expected a 1-D DeviceMesh, got one with 2 dims"):
        odysseus.parallelize(ref, strategy, group=init_device_mesh("cpu", (1, world)))
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_device_mesh_is_accepted(strategy):
    assert all(run_ranks(2, _mesh, strategy))


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown strategy 'megatron'; expected one of \('tp', 'tp-sp'"):
        odysseus.parallelize(make_block(), "megatron")


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown overlap backend 'fast'; expected one of \('auto'"):
        odysseus.parallelize(make_block(), "odysseus", backend="fast")


def test_module_type_it_cannot_parallelize():
    with pytest.raises(TypeError, match="cannot parallelize a Linear; expected odysseus.reference.TransformerBlock"):
        odysseus.parallelize(nn.Linear(4, 4), "tp")


def test_bad_group_type():
    with pytest.raises(TypeError, match="expected a ProcessGroup, a 1-D DeviceMesh or None, got int"):
        odysseus.parallelize(make_block(), "tp", group=3)


def _too_many_ranks(rank, world):
    cfg = TransformerConfig(hidden_size=48, num_heads=3, num_kv_heads=1, intermediate_size=3)
    errors = {}
    for strategy in STRATEGIES:
        try:
            ParallelBlock(cfg, strategy)
            errors[strategy] = None
        except ValueError as e:
            errors[strategy] = str(e)
    return errors


def test_more_ranks_than_heads():
    errors = run_ranks(4, _too_many_ranks)[0]
    for strategy in ("tp", "tp-sp", "ulysses", "odysseus"):
        assert "cannot split num_heads=3 over world size 4" in errors[strategy], errors
    errors = run_ranks(3, _too_many_ranks)[0]
    assert errors == {s: None for s in STRATEGIES}


def _bad_inputs(rank, world, strategy):
    ref = make_block(**ODD)
    par = odysseus.parallelize(ref, strategy)
    x = shard_sequence(torch.randn(2, 61, 96)) if strategy != "tp" else torch.randn(2, 61, 96)
    msgs = []
    for call, exc in [
        (lambda: par(x[0]), ValueError),
        (lambda: par(x[..., :64]), ValueError),
        (lambda: par(x.double()), TypeError),
        (lambda: par(x, torch.arange(x.shape[1] + 1)), ValueError),
    ]:
        with pytest.raises(exc) as info:
            call()
        msgs.append(str(info.value))
    if strategy != "tp":  # ranks hold shards of the wrong lengths: detected from the lengths they exchange
        with pytest.raises(ValueError) as info:
            par(torch.randn(2, 30 + rank, 96))
        msgs.append(str(info.value))
    return msgs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_input_messages(strategy):
    msgs = run_ranks(2, _bad_inputs, strategy)[1]
    assert "expected x of shape (batch, seq, hidden), got 2 dims" in msgs[0]
    assert "expected hidden size 96, got x.shape[-1]=64" in msgs[1]
    assert "input dtype torch.float64 does not match weight dtype torch.float32" in msgs[2]
    n = 61 if strategy == "tp" else 30  # rank 1's tokens
    assert f"position_ids of shape (1, {n + 1}) do not match the input: expected ({n},)" in msgs[3]
    if strategy != "tp":
        assert "lengths [30, 31]" in msgs[4] and "as [31, 30]" in msgs[4]
