"""Every strategy against the reference block with identical weights: output, input grad, every weight grad."""

import pytest
import torch
from helpers import (
    EVEN,
    ODD,
    STRATEGY_BACKENDS,
    assert_low_precision_within,
    assert_runs_close,
    make_block,
    run_parallel,
    run_reference,
)
from multirank import run_ranks

import odysseus
from odysseus import STRATEGIES, dense_state_dict


def _parity(rank, world, strategy, shape, B, L, what, with_pos, backend="auto"):
    ref = make_block(torch.float32, **shape)
    if what == "attn":
        ref = ref.self_attn
    elif what == "ffn":
        ref = ref.mlp
    par = odysseus.parallelize(ref, strategy, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, ref.config.hidden_size, generator=g)
    gy = torch.randn(B, L, ref.config.hidden_size, generator=g)
    pos = torch.randint(0, 10_000, (B, L), generator=g) if with_pos else None
    assert_runs_close(run_parallel(par, x, gy, pos), run_reference(ref, x, gy, pos), strategy)
    weights = dense_state_dict(par)
    for k, w in ref.state_dict().items():
        assert torch.equal(weights[k], w), f"{k} weight"
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy, backend", STRATEGY_BACKENDS)
@pytest.mark.parametrize("shape", [ODD, EVEN], ids=["odd", "even"])
def test_block_parity_fp32_numerics(strategy, backend, world, shape):
    B, L = (2, 61) if shape is ODD else (1, 32)
    assert all(run_ranks(world, _parity, strategy, shape, B, L, "block", False, backend))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("what", ["attn", "ffn"])
def test_module_parity_fp32_numerics(strategy, what):
    assert all(run_ranks(3, _parity, strategy, ODD, 2, 61, what, False))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_given_positions_parity_numerics(strategy):
    assert all(run_ranks(3, _parity, strategy, ODD, 2, 61, "block", True))


def _bf16(rank, world, strategy, backend):
    ref64 = make_block(torch.float64, **ODD)
    ref16 = make_block(torch.bfloat16, **ODD)
    par = odysseus.parallelize(ref16, strategy, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 61, 96, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 61, 96, generator=g, dtype=torch.float64)
    truth = run_reference(ref64, x, gy)
    base = run_reference(ref16, x.bfloat16(), gy.bfloat16())
    ours = run_parallel(par, x.bfloat16(), gy.bfloat16())
    return assert_low_precision_within(ours, base, truth, f"{strategy} bf16", factor=3, slack=1e-3)


@pytest.mark.parametrize("strategy, backend", STRATEGY_BACKENDS)
def test_bf16_error_within_3x_reference_numerics(strategy, backend):
    run_ranks(3, _bf16, strategy, backend)
