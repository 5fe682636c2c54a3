"""The closed-form per-rank volumes in odysseus.volume against the CommLedger, record for record."""

import pytest
import torch
from helpers import EVEN, ODD, make_block
from multirank import run_ranks

import odysseus
from odysseus import STRATEGIES, CommLedger, finalize_grads, shard_sequence
from odysseus.volume import bytes_per_rank, expected_records


def _ledger(rank, world, strategy, shape, B, L, backend="auto"):
    ref = make_block(torch.float32, **shape)
    par = odysseus.parallelize(ref, strategy, backend=backend)
    x = torch.randn(B, L, ref.config.hidden_size)
    x = x if strategy == "tp" else shard_sequence(x)
    x.requires_grad_()
    with CommLedger() as led:
        par(x).square().sum().backward()
        finalize_grads(par)
    got = sorted((r.phase, r.op, r.category, r.bytes_received) for r in led.records if r.category != "metadata")
    want = sorted(expected_records(strategy, ref.config, B, L, world, rank, dtype_bytes=4))
    assert got == want, f"rank {rank}:\nledger  {got}\nformula {want}"
    assert all(r.group_size == world for r in led.records)
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world, shape, B, L", [(2, EVEN, 1, 32), (3, ODD, 2, 61), (4, ODD, 2, 61), (4, EVEN, 2, 37)])
def test_ledger_matches_closed_form(strategy, world, shape, B, L):
    assert all(run_ranks(world, _ledger, strategy, shape, B, L))


@pytest.mark.parametrize("strategy", ["tp-sp", "odysseus"])
def test_every_backend_gives_the_same_ledger(strategy):
    for backend in ("naive", "pipelined"):
        assert all(run_ranks(3, _ledger, strategy, ODD, 2, 61, backend))


def test_textbook_ratios_hold_where_they_should():
    cfg = odysseus.TransformerConfig(hidden_size=4096, num_heads=32, intermediate_size=11008)
    for N in (2, 4, 8):
        v = {s: bytes_per_rank(s, cfg, 1, 65536, N) for s in STRATEGIES}
        assert v["odysseus"]["activation"] * 2 == v["tp-sp"]["activation"] == v["tp"]["activation"]
        assert v["ulysses"]["activation"] * N == v["tp-sp"]["activation"]  # O(Ld/N): 8(N-1)/N^2 vs 8(N-1)/N
        assert v["tp-sp"]["gradient"] < v["odysseus"]["gradient"] < v["ulysses"]["gradient"]
