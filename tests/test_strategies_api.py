"""Construction, groups and bad input of the strategy modules."""

import pytest
import torch
from helpers import ODD, assert_close, local_input, make_block
from multirank import run_ranks
from torch import nn

import odysseus
from odysseus import STRATEGIES, ParallelBlock, TransformerConfig, dense_state_dict
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
    xin = local_input(strategy, x, mesh)
    assert_close(a(xin), b(xin), 0, 0, f"{strategy}: DeviceMesh vs default group")
    with pytest.raises(
        ValueError, match=r"a 2-D DeviceMesh \(1, 2\) with dims named None: expected dims named \('dp', 'sp'\)"
    ):
        odysseus.parallelize(ref, strategy, group=init_device_mesh("cpu", (1, world)))
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_device_mesh_is_accepted(strategy):
    assert all(run_ranks(2, _mesh, strategy))


def test_module_type_it_cannot_parallelize():
    with pytest.raises(TypeError, match="cannot parallelize a Linear; expected odysseus.reference.TransformerBlock"):
        odysseus.parallelize(nn.Linear(4, 4), "tp")


def test_bad_group_type():
    with pytest.raises(TypeError, match=r"expected a ProcessGroup, a 1-D DeviceMesh, .* or None; got int"):
        odysseus.parallelize(make_block(), "tp", group=3)
