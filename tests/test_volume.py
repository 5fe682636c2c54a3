"""The closed forms in odysseus.plan.forms against the CommLedger, record for record: phase, op, category, label,
bytes sent and bytes received, on every rank, for every strategy and every overlap backend."""

from collections import Counter

import pytest
import torch
from helpers import EVEN, ODD, local_input, make_block
from multirank import run_ranks

import odysseus
from odysseus import STRATEGIES, CommLedger, finalize_grads
from odysseus.plan import Case, Collective, bytes_per_rank, expected_collectives

# The overlap backends whose ledger is checked (symm through the emulated runtime).
LEDGER_BACKENDS = ["naive", "pipelined", "symm"]


def check_ledger(led: CommLedger, strategy, config, B, L, world, rank, dtype_bytes=4) -> None:
    """Raise AssertionError naming every record the ledger and the closed form do not share."""
    got = Counter(
        Collective(r.phase, r.op, r.category, r.label, r.bytes_sent, r.bytes_received)
        for r in led.records
        if r.category != "metadata"
    )
    want = Counter(expected_collectives(Case(strategy, config, B, L, world, rank, dtype_bytes)))
    if got != want:
        only_got, only_want = sorted((got - want).elements()), sorted((want - got).elements())
        raise AssertionError(f"{strategy} rank {rank}:\nonly in the ledger {only_got}\nonly in the formula {only_want}")
    bad = [r for r in led.records if r.group_size != world]
    assert not bad, f"rank {rank}: group sizes {bad}"


def _ledger(rank, world, strategy, shape, B, L, backend):
    ref = make_block(torch.float32, **shape)
    par = odysseus.parallelize(ref, strategy, backend=backend)
    x = torch.randn(B, L, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
    x = local_input(strategy, x)
    x.requires_grad_()
    with CommLedger() as led:
        par(x).square().sum().backward()
        finalize_grads(par)
    check_ledger(led, strategy, ref.config, B, L, world, rank)
    return True


@pytest.mark.parametrize("backend", LEDGER_BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ledger_matches_closed_form_uneven(strategy, backend):
    # 61 tokens over 3 ranks (21, 20, 20); 6 heads of 2 kv heads: rank 1's kv head is shared.
    assert all(run_ranks(3, _ledger, strategy, ODD, 2, 61, backend))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world, shape, B, L", [(2, EVEN, 1, 32), (4, ODD, 2, 61), (4, EVEN, 2, 37)])
def test_ledger_matches_closed_form(strategy, world, shape, B, L):
    assert all(run_ranks(world, _ledger, strategy, shape, B, L, "auto"))


def _planted(rank, world, backend, field):
    """Record one peer's share of ``field`` instead of all peers': check_ledger must refuse it.

    Every backend's all-gather⊗GEMM and GEMM⊗reduce-scatter is recorded in one place, odysseus.overlap.ops.
    """
    from odysseus.overlap import ops as module

    real = module.record

    def one_peer(op, sent, received, group_size, *args, **kwargs):
        if field == "bytes_sent":
            sent //= group_size - 1
        else:
            received //= group_size - 1
        return real(op, sent, received, group_size, *args, **kwargs)

    module.record = one_peer
    try:
        _ledger(rank, world, "tp-sp", ODD, 2, 61, backend)
    except AssertionError as err:
        return str(err)
    finally:
        module.record = real
    return None


@pytest.mark.parametrize("field", ["bytes_sent", "bytes_received"])
@pytest.mark.parametrize("backend", ["pipelined"])  # the ops record in one place, whatever the backend
def test_ledger_check_catches_one_peers_bytes(backend, field):
    for rank, msg in enumerate(run_ranks(3, _planted, backend, field)):
        assert msg is not None, f"rank {rank}: a ledger recording one peer's {field} passed the check"
        assert "only in the ledger" in msg and "all_gather" in msg and "reduce_scatter" in msg, msg


def test_textbook_ratios_hold_where_they_should():
    cfg = odysseus.TransformerConfig(hidden_size=4096, num_heads=32, intermediate_size=11008)
    for N in (2, 4, 8):
        v = {s: bytes_per_rank(Case(s, cfg, 1, 65536, N)) for s in STRATEGIES}
        assert v["odysseus"]["activation"] * 2 == v["tp-sp"]["activation"] == v["tp"]["activation"]
        assert v["ulysses"]["activation"] * N == v["tp-sp"]["activation"]  # O(Ld/N): 8(N-1)/N^2 vs 8(N-1)/N
        assert v["tp-sp"]["gradient"] < v["odysseus"]["gradient"] < v["ulysses"]["gradient"]


def test_closed_forms_give_the_textbook_bytes_on_even_shapes():
    """Bytes written out by hand, independent of odysseus.layout's byte rules, which the ledger and the closed
    forms share (a wrong rule would move both alike and pass the ledger comparison). Even shapes: 12 tokens
    and 4 heads (head_dim 2) over 4 ranks, fp32, so every rank sends what it receives."""
    cfg = odysseus.TransformerConfig(hidden_size=8, num_heads=4, intermediate_size=16)
    B, L, N, e, d = 2, 12, 4, 4, 8
    shard = B * (L // N) * d * e  # one rank's rows of the (B, L, d) activation: 192 bytes
    all_reduce = 2 * (N - 1) * B * L * d * e // N  # reduce-scatter + all-gather: 1152 bytes
    norms = 2 * (N - 1) * 2 * d * e // N  # the two norms' gradients: 96 bytes
    q_a2a = B * (L // N) * (N - 1) * 2 * e  # N-1 peers' tokens of this rank's one head (or the reverse): 144
    want = {
        "tp": {("forward", "all_reduce", "attn.out"): all_reduce, ("backward", "all_reduce", "ffn.up"): all_reduce},
        "tp-sp": {
            ("forward", "all_gather", "attn.qkv"): (N - 1) * shard,
            ("forward", "reduce_scatter", "ffn.down"): (N - 1) * shard,
            ("backward", "all_reduce", "grads"): norms,
        },
        "ulysses": {("forward", "all_to_all", "attn.q"): q_a2a, ("backward", "all_to_all", "attn.v"): q_a2a},
        "odysseus": {
            ("backward", "all_gather", "attn.out"): (N - 1) * shard,
            ("backward", "all_reduce", "grads"): norms + 2 * (N - 1) * 3 * d * 16 * e // N,
        },
    }
    for strategy, expected in want.items():
        for rank in range(N):
            got = {(x.phase, x.op, x.label): x for x in expected_collectives(Case(strategy, cfg, B, L, N, rank, e))}
            for key, b in expected.items():
                assert (got[key].bytes_sent, got[key].bytes_received) == (b, b), (strategy, rank, key, got[key])
