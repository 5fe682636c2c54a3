"""Sequence collectives: round trips, autograd duals against dense gradients, exact ledger bytes."""

import pytest
import torch
from helpers import assert_close
from multirank import run_ranks
from test_volume import LEDGER_BACKENDS

from odysseus import CommLedger, gather_sequence, shard_sequence
from odysseus.comm import (
    all_gather_seq,
    copy_to_tp,
    head_ranges,
    heads_to_seq,
    kv_range,
    offsets,
    reduce_from_tp,
    reduce_scatter_seq,
    resolve_group,
    seq_to_heads,
    shard_sizes,
)

WORLDS = [1, 2, 3, 4]


def test_shard_sizes_rule():
    assert shard_sizes(61, 3) == [21, 20, 20]
    assert shard_sizes(62, 4) == [16, 16, 15, 15]
    assert shard_sizes(8, 4) == [2, 2, 2, 2]
    assert head_ranges(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert kv_range((2, 4), 3) == (0, 2)
    assert kv_range((3, 6), 3) == (1, 2)


def _rank_tensor(rank, *shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 * seed + rank), dtype=torch.float64)


def _round_trips(rank, world, L):
    x = _rank_tensor(0, 2, L, 5)  # same on every rank
    xl = shard_sequence(x)
    assert xl.shape[1] == shard_sizes(L, world)[rank]
    assert torch.equal(gather_sequence(xl), x)
    # along another dim
    assert torch.equal(gather_sequence(shard_sequence(x, dim=2), dim=2), x)
    # seq -> heads -> seq
    H, D = 6, 4
    q = _rank_tensor(0, 2, L, H, D)
    ql = shard_sequence(q)
    pg = resolve_group()
    sizes = shard_sizes(L, world)
    ranges = head_ranges(H, world)
    qh = seq_to_heads(ql, sizes, ranges, pg)
    s, e = ranges[rank]
    assert torch.equal(qh, q[:, :, s:e])
    assert torch.equal(heads_to_seq(qh, sizes, ranges, H, pg), ql)
    return True


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("L", [61, 8])
def test_round_trips(world, L):
    assert all(run_ranks(world, _round_trips, L))


def _duals(rank, world, L):
    """Each op's gradient equals the gradient of the same computation done on gathered tensors."""
    pg = resolve_group()
    sizes, o = shard_sizes(L, world), offsets(shard_sizes(L, world))
    lo, hi = o[rank], o[rank + 1]
    B, d = 2, 3
    w = [_rank_tensor(r, B, L, d, seed=1) for r in range(world)]  # every rank knows every rank's weights
    x_full = _rank_tensor(0, B, L, d, seed=2)
    out = {}

    # all-gather: loss = sum_r <gather(x), w_r>  =>  d/dx = sum_r w_r
    xl = x_full[:, lo:hi].clone().requires_grad_()
    (all_gather_seq(xl, sizes, pg) * w[rank]).sum().backward()
    assert_close(xl.grad, sum(w)[:, lo:hi], 1e-12, 1e-12, "all_gather dual")

    # reduce-scatter: y_r = (sum_s x_s)[shard r]; loss = sum_r <y_r, w_r[shard r]>  =>  d/dx_s = cat_r w_r[shard r]
    xr = _rank_tensor(rank, B, L, d, seed=3).requires_grad_()
    y = reduce_scatter_seq(xr, sizes, pg)
    xs = [_rank_tensor(r, B, L, d, seed=3) for r in range(world)]
    assert_close(y, sum(xs)[:, lo:hi], 1e-12, 1e-12, "reduce_scatter value")
    (y * w[rank][:, lo:hi]).sum().backward()
    expected = torch.cat([w[r][:, o[r] : o[r + 1]] for r in range(world)], dim=1)
    assert_close(xr.grad, expected, 1e-12, 1e-12, "reduce_scatter dual")

    # shard of a replicated tensor: d/dx = cat_r w_r[shard r] on every rank
    xf = x_full.clone().requires_grad_()
    (shard_sequence(xf) * w[rank][:, lo:hi]).sum().backward()
    assert_close(xf.grad, expected, 1e-12, 1e-12, "shard_sequence dual")

    # seq -> heads with overlapping (GQA kv) ranges: d/dx = sum_r w_r placed at heads ranges[r]
    KV, D, q_per_kv = 2, 4, 3
    ranges = [kv_range(qr, q_per_kv) for qr in head_ranges(6, world)]
    kvx = _rank_tensor(0, B, L, KV, D, seed=4)
    kl = kvx[:, lo:hi].clone().requires_grad_()
    wh = [_rank_tensor(r, B, L, e - s, D, seed=5) for r, (s, e) in enumerate(ranges)]
    y = seq_to_heads(kl, sizes, ranges, pg)
    assert torch.equal(y, kvx[:, :, ranges[rank][0] : ranges[rank][1]])
    (y * wh[rank]).sum().backward()
    dense = torch.zeros(B, L, KV, D, dtype=torch.float64)
    for (s, e), wr in zip(ranges, wh):
        dense[:, :, s:e] += wr
    assert_close(kl.grad, dense[:, lo:hi], 1e-12, 1e-12, "seq_to_heads dual (overlapping ranges)")

    # heads -> seq: y_r = (sum_i x_i placed at ranges[i])[shard r]; d/dx_i = W[:, :, ranges[i]], W = cat_r w_r
    hr = head_ranges(6, world)
    s, e = hr[rank]
    xh = _rank_tensor(rank, B, L, e - s, D, seed=6).requires_grad_()
    wq = [_rank_tensor(r, B, sizes[r], 6, D, seed=7) for r in range(world)]
    y = heads_to_seq(xh, sizes, hr, 6, pg)
    full = torch.cat([_rank_tensor(i, B, L, b - a, D, seed=6) for i, (a, b) in enumerate(hr)], dim=2)
    assert torch.equal(y, full[:, lo:hi])
    (y * wq[rank]).sum().backward()
    assert_close(xh.grad, torch.cat(wq, dim=1)[:, :, s:e], 1e-12, 1e-12, "heads_to_seq dual")

    # TP copy: identity, gradient summed over the column-split consumers
    xc = x_full.clone().requires_grad_()
    (copy_to_tp(xc, pg) * w[rank]).sum().backward()
    assert_close(xc.grad, sum(w), 1e-12, 1e-12, "copy_to_tp dual")
    # TP reduce: all-reduce forward; the consumer is replicated, so the gradient passes through
    xp = _rank_tensor(rank, B, L, d, seed=8).requires_grad_()
    y = reduce_from_tp(xp, pg)
    assert_close(y, sum(_rank_tensor(r, B, L, d, seed=8) for r in range(world)), 1e-12, 1e-12, "all_reduce")
    (y * w[0]).sum().backward()
    assert_close(xp.grad, w[0], 1e-12, 1e-12, "reduce_from_tp dual")
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_autograd_duals(world):
    run_ranks(world, _duals, 61 if world > 1 else 7)


def _ledger_bytes(rank, world):
    pg = resolve_group()
    sizes = [21, 20, 20]  # L = 61 over 3 ranks, fp32, batch 2, width 3 -> a token row is 2*3*4 = 24 bytes
    x = torch.zeros(2, sizes[rank], 3)
    with CommLedger() as led:
        y = all_gather_seq(x.requires_grad_(), sizes, pg, label="ag")
        y.sum().backward()
        q = torch.zeros(1, sizes[rank], 6, 2)  # 6 heads of width 2 over 3 ranks: 2 heads each
        seq_to_heads(q, sizes, head_ranges(6, 3), pg)
        reduce_from_tp(torch.zeros(10), pg)
    return [(r.op, r.phase, r.bytes_sent, r.bytes_received, r.group_size) for r in led.records]


def test_ledger_exact_bytes_uneven():
    got = run_ranks(3, _ledger_bytes)
    # all_gather: receive the other two shards; send own shard to two peers.
    # reduce_scatter (backward): receive 2 contributions to own shard; send contributions to the other shards.
    # all_to_all (fp32, 1 batch, 2 heads of width 2 per rank): a token row per peer chunk is 2*2*4 = 16 bytes.
    # all_reduce of 10 fp32 = reduce-scatter over chunks [4, 3, 3] + all-gather.
    expected = {
        0: [
            ("all_gather", "forward", 2 * 21 * 24, (20 + 20) * 24, 3),
            ("reduce_scatter", "backward", (20 + 20) * 24, 2 * 21 * 24, 3),
            ("all_to_all", "forward", 2 * 21 * 16, (20 + 20) * 16, 3),
            ("all_reduce", "forward", (6 + 2 * 4) * 4, (6 + 2 * 4) * 4, 3),
        ],
        1: [
            ("all_gather", "forward", 2 * 20 * 24, (21 + 20) * 24, 3),
            ("reduce_scatter", "backward", (21 + 20) * 24, 2 * 20 * 24, 3),
            ("all_to_all", "forward", 2 * 20 * 16, (21 + 20) * 16, 3),
            ("all_reduce", "forward", (7 + 2 * 3) * 4, (7 + 2 * 3) * 4, 3),
        ],
    }
    expected[2] = [(op, ph, s, r, n) for (op, ph, s, r, n) in expected[1]]
    for rank in range(3):
        assert got[rank] == expected[rank], f"rank {rank}: {got[rank]}"


def _overlap_ledger(rank, world, backend):
    from odysseus.overlap import ag_matmul, matmul_rs

    pg = resolve_group()
    sizes = [21, 20, 20]  # L = 61 over 3 ranks
    with CommLedger() as led:
        x = torch.randn(2, sizes[rank], 3, requires_grad=True)  # fp32, batch 2, K = 3
        ag_matmul(x, torch.randn(3, 5), sizes, pg, backend, "ag").sum().backward()
        p = torch.randn(2, 61, 4, requires_grad=True)  # partial sums, K_r = 4, N = 5
        matmul_rs(p, torch.randn(4, 5), sizes, pg, backend, "rs").sum().backward()
    return [(r.op, r.phase, r.label, r.bytes_sent, r.bytes_received, r.group_size) for r in led.records]


@pytest.mark.parametrize("backend", LEDGER_BACKENDS)
def test_overlap_ops_ledger_exact_bytes_uneven(backend):
    got = run_ranks(3, _overlap_ledger, backend)
    for rank, mine in enumerate([21, 20, 20]):
        others = 61 - mine
        k, n = 2 * 3 * 4, 2 * 5 * 4  # bytes of one token row (batch 2, fp32) of width K = 3 and N = 5
        # all-gather: own rows to each of the 2 peers, the peers' rows in; reduce-scatter: the reverse.
        # Backward runs the dual on the same rows: dx of ag_matmul is reduce-scattered at width K, the
        # output gradient of matmul_rs all-gathered at width N.
        expected = [
            ("all_gather", "forward", "ag", 2 * mine * k, others * k, 3),
            ("reduce_scatter", "backward", "ag", others * k, 2 * mine * k, 3),
            ("reduce_scatter", "forward", "rs", others * n, 2 * mine * n, 3),
            ("all_gather", "backward", "rs", 2 * mine * n, others * n, 3),
        ]
        assert got[rank] == expected, f"rank {rank} ({backend}): {got[rank]}"


def test_ledger_helpers():
    from odysseus.comm import record

    with CommLedger() as led:
        record("all_gather", 10, 20, 2, label="a")
        record("reduce_scatter", 5, 6, 2, category="gradient")
        record("all_gather", 1, 2, 2)
    assert led.total("op") == {"all_gather": 22, "reduce_scatter": 6}
    assert led.total("category", "bytes_sent") == {"activation": 11, "gradient": 5}
    assert led.count("op") == {"all_gather": 2, "reduce_scatter": 1}
    assert led.bytes(op="all_gather", label="a") == 20
    assert "| forward | reduce_scatter | gradient |" in led.table()
    record("all_gather", 1, 1, 2)  # outside the ledger: not recorded
    assert len(led.records) == 3


def _bad_layouts(rank, world):
    errors = []
    x = torch.zeros(2, 3, 4)
    for call in (
        lambda: shard_sequence(x, dim=3),
        lambda: shard_sequence(torch.zeros(2, world - 1, 4)),
        lambda: gather_sequence(torch.zeros(2, 5 if rank == 0 else 3, 4)),  # not a shard_sequence layout
    ):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_bad_layouts_raise_on_every_rank():
    for errs in run_ranks(2, _bad_layouts):
        assert "dim=3 is out of range" in errs[0]
        assert "cannot be split over 2 ranks" in errs[1]
        assert "[5, 3]" in errs[2] and "[4, 4]" in errs[2]
