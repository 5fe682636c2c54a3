"""save_input="shard": all-gather⊗GEMMs keep only this rank's shard and stream every gather through a ring.

Numerics equal the reference for every strategy that uses the overlap ops, every CPU backend, worlds 1-4,
odd shapes and rings small enough that slots are refilled many times; the activations saved for backward
shrink by exactly the gathered rows that are no longer kept; the ledger gains one backward all-gather per
all-gather⊗GEMM.
"""

import pytest
import torch
from helpers import ODD, assert_low_precision_within, assert_runs_close, make_block, run_parallel, run_reference
from multirank import run_ranks

import odysseus
from odysseus import CommLedger, shard_sequence
from odysseus.overlap import Ring
from odysseus.profiling import SavedActivations

RINGS = [Ring(), Ring(tokens=3, slots=1), Ring(tokens=2, slots=3)]


def _parity(rank, world, strategy, backend, ring):
    ref = make_block(torch.float32, **ODD)
    par = odysseus.parallelize(ref, strategy, backend=backend, save_input="shard", ring=ring)
    g = torch.Generator().manual_seed(2)
    x, gy = torch.randn(2, 61, 96, generator=g), torch.randn(2, 61, 96, generator=g)
    assert_runs_close(run_parallel(par, x, gy), run_reference(ref, x, gy), f"{strategy}/{backend} shard {ring}")
    return True


# Worlds 1-4 with the default ring; worlds 3 and 4 also with rings whose slots are refilled many times.
CASES = [(w, RINGS[0]) for w in (1, 2, 3, 4)] + [(w, r) for w in (3, 4) for r in RINGS[1:]]


@pytest.mark.parametrize("world, ring", CASES, ids=[f"w{w}-{r.tokens}x{r.slots}" for w, r in CASES])
@pytest.mark.parametrize("backend", ["naive", "pipelined"])
@pytest.mark.parametrize("strategy", ["tp-sp", "odysseus"])
def test_shard_mode_matches_reference_numerics(world, ring, strategy, backend):
    assert all(run_ranks(world, _parity, strategy, backend, ring))


def _bf16(rank, world, strategy, backend):
    ref64, ref16 = make_block(torch.float64, **ODD), make_block(torch.bfloat16, **ODD)
    par = odysseus.parallelize(ref16, strategy, backend=backend, save_input="shard", ring=Ring(tokens=5))
    g = torch.Generator().manual_seed(1)
    x, gy = (
        torch.randn(2, 61, 96, generator=g, dtype=torch.float64),
        torch.randn(2, 61, 96, generator=g, dtype=torch.float64),
    )
    truth, base = run_reference(ref64, x, gy), run_reference(ref16, x.bfloat16(), gy.bfloat16())
    assert_low_precision_within(
        run_parallel(par, x.bfloat16(), gy.bfloat16()), base, truth, f"{strategy} bf16", 3, 1e-3
    )
    return True


@pytest.mark.parametrize("backend", ["naive", "pipelined"])
@pytest.mark.parametrize("strategy", ["tp-sp", "odysseus"])
def test_shard_mode_bf16_within_3x_reference_numerics(strategy, backend):
    assert all(run_ranks(3, _bf16, strategy, backend))


def _saved_and_ledger(rank, world, strategy, save_input):
    ref = make_block(torch.float32, **ODD)
    par = odysseus.parallelize(ref, strategy, backend="pipelined", save_input=save_input)
    x = shard_sequence(torch.randn(2, 61, 96, generator=torch.Generator().manual_seed(0))).requires_grad_()
    with CommLedger() as led:
        with SavedActivations(par) as saved:
            y = par(x)
        y.square().sum().backward()
    counts = led.count("op", phase="backward", category="activation")
    return saved.peak_bytes, counts


@pytest.mark.parametrize("strategy, gathers", [("tp-sp", 2), ("odysseus", 1)])
def test_shard_mode_keeps_only_the_shard_and_regathers_in_backward(strategy, gathers):
    world, B, L, d = 3, 2, 61, 96
    kept = run_ranks(world, _saved_and_ledger, strategy, "gathered")
    lean = run_ranks(world, _saved_and_ledger, strategy, "shard")
    sizes = odysseus.comm.shard_sizes(L, world)
    for rank in range(world):
        # Each all-gather⊗GEMM input is d wide (the normed activations): the gathered rows of the other ranks
        # are no longer kept.
        assert kept[rank][0] - lean[rank][0] == gathers * (L - sizes[rank]) * B * d * 4, (kept[rank][0], lean[rank][0])
        more = dict(lean[rank][1])
        more["all_gather"] -= gathers  # the re-gathers for the weight gradients
        assert more == kept[rank][1], (lean[rank][1], kept[rank][1])


def test_bad_save_input_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown save_input 'all'; expected one of \('gathered', 'shard'\)"):
        odysseus.parallelize(make_block(), "odysseus", save_input="all")
    with pytest.raises(ValueError, match=r"Ring.slots=0 must be >= 1"):
        Ring(slots=0)
