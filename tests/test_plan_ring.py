"""The planner's ring dim (odysseus.plan.ring) and attention efficiency curve (odysseus.plan.efficiency): hand-checked
forms on small cases, R = 1 as the model without a ring, the max-seq search over R, and the command line."""

from __future__ import annotations

import dataclasses
import math

import pytest

from odysseus import plan
from odysseus.config import TransformerConfig
from odysseus.ops import ring_attention as ops_ring_attention
from odysseus.plan import MODELS, Assumptions, Case, forms, get_hardware
from odysseus.plan import __main__ as cli
from odysseus.plan import ring as plan_ring
from odysseus.plan.efficiency import SEQ, TFLOPS, attention_efficiency, figure_tflops
from odysseus.plan.forms import weight_numel
from odysseus.plan.ring import (
    attention_steps,
    chunk_sizes,
    crosses_nodes,
    hop_bytes,
    load_balance_factor,
    ring_exposed,
    ring_grad_records,
    ring_records,
    ring_transients,
    ring_weight_numel,
    step_pairs,
)

ODD = TransformerConfig(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160)  # head_dim 16


def test_step_pairs_and_load_balance_by_hand():
    # L = 8, R = 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    # Step 0, rank 0: (0,0) diagonal 2 + (3,0) 4 + (3,3) diagonal 2 = 8; step 1 against chunks 1, 2: (3,1) + (3,2) = 8.
    assert step_pairs([2, 2, 2, 2], 2) == [[8.0, 8.0], [8.0, 8.0]]
    assert load_balance_factor([2, 2, 2, 2], 2) == 1.0
    # Contiguous halves: rank 1 does 8 then 16 while rank 0 waits at step 1: (8 + 16) / (32 / 2) = (2R - 1) / R.
    assert step_pairs([2, 2, 2, 2], 2, balanced=False) == [[8.0, 8.0], [0.0, 16.0]]
    assert load_balance_factor([2, 2, 2, 2], 2, balanced=False) == 1.5
    assert load_balance_factor([3] * 6, 3, balanced=False) == pytest.approx(5 / 3)
    assert load_balance_factor([3] * 6, 3) == 1.0
    # Whatever the chunks, the ring covers the causal half of L x L exactly once; R = 1 is one causal block.
    chunks = chunk_sizes(61, 3)
    assert chunks == [11, 10, 10, 10, 10, 10]
    assert sum(map(sum, step_pairs(chunks, 3))) == pytest.approx(61**2 / 2)
    assert sum(map(sum, step_pairs(chunks, 3, causal=False))) == 61**2
    assert step_pairs(chunk_sizes(61, 1), 1) == [[61**2 / 2]]
    # Uneven chunks: the rank holding the long head chunk is the slowest of step 0.
    assert load_balance_factor(chunks, 3) > 1.0


def test_hop_bytes_and_records_by_hand():
    # L = 60 over ring 3 x sp 2: 20 tokens per ring rank; 3 query heads and 1 kv head per sp rank (hd 16).
    case = Case("ulysses", ODD, 1, 20, 2, 0, ring=3)
    assert hop_bytes(case) == 1 * 20 * 1 * 16 * 2 * 2
    assert (
        ring_records(case)
        == [("forward", "send_recv", "activation", 1280)] * 2 + [("backward", "send_recv", "activation", 1280)] * 5
    )
    # sp 4 over 6 heads: query heads [2, 2, 1, 1]; rank 1's heads 2, 3 read kv heads 0 and 1 (unexpanded: 2).
    four = Case("odysseus", ODD, 2, 10, 4, 1, ring=2)
    assert four.shape.kv_heads == 2 and hop_bytes(four) == 2 * 10 * 2 * 16 * 2 * 2
    assert ring_records(dataclasses.replace(case, ring=1, seq=60)) == []


@pytest.mark.parametrize("ring, sp, rank", [(3, 2, 0), (2, 4, 1), (4, 1, 3)])
def test_planner_ring_records_are_the_ledgers_closed_form(ring, sp, rank):
    # The planner times the hops the modules make: per rank, the ledger's closed form (forms.ring_collectives,
    # checked record for record against the CommLedger in tests/test_ring.py) where L/R is whole.
    seq = 2 * ring * 5
    case = Case("ulysses", ODD, 2, seq // ring, sp, rank % sp, ring=ring)
    ledger = forms.ring_collectives(ODD, 2, seq, ring, sp, rank // sp % ring, rank % sp, 2)
    assert ring_records(case) == [(c.phase, c.op, c.category, c.bytes_received) for c in ledger]


def test_ring_exposed_by_hand():
    # R = 3, hops of 1 s, fully overlappable: forward steps of 0.5 s hide half of each of the 2 hops (1 s exposed);
    # backward steps of 2 s hide the K/V and dK/dV hops (1, 2, 1 s); the last dK/dV hop home is exposed: 2 s, 7 hops.
    assert ring_exposed(3, 1.0, 1.0, [0.5] * 3, [2.0] * 3, passes=1) == (2.0, 7)
    # Nothing overlaps: every hop is exposed, and recomputation runs the forward's twice.
    assert ring_exposed(3, 1.0, 0.0, [9.0] * 3, [9.0] * 3, passes=2) == (9.0, 9)
    assert ring_exposed(1, 1.0, 1.0, [1.0], [1.0], passes=1) == (0.0, 0)


def test_ring_1_is_the_model_without_a_ring():
    hw, a = get_hardware("a100-nvlink"), Assumptions()
    for name in ("tp", "tp-sp", "ulysses", "odysseus+zero3"):
        case = Case(name, ODD, 2, 61, 3, 1)
        fwd, bwd, flops = attention_steps(case, hw, a)
        assert flops == pytest.approx(plan.attention_flops(case)) and len(fwd) == len(bwd) == 1
        # The constant efficiency on A100: the attention time is flops / (peak x 0.5), backward 2.5x.
        assert fwd[0] == pytest.approx(flops / (hw.peak_flops * a.attention_efficiency))
        assert bwd[0] == pytest.approx(2.5 * fwd[0])
        assert ring_transients(case) == (0, 0) and ring_grad_records(case, 4, 100, False) == []
        assert ring_weight_numel(case) == weight_numel(case)
        assert not [m for m in plan.block_peak(case).moments if m.startswith("ring")]
        cost = plan.block_cost(case, hw, a)
        assert cost.comm_bytes == sum(b for *_, b in plan.strategy_records(case))


def test_ring_conserves_work_and_activations_per_rank():
    """(ring 2, sp 3) and (ring 1, sp 6) split the same work: per rank the same attention and GEMM flops (MHA: no kv
    head held twice), the same saved activations where no weight is split (no full-length K/V anywhere), and
    ZeRO-3 shards over all six ranks."""
    hw, a = get_hardware("a100-nvlink"), Assumptions()
    mha = dataclasses.replace(ODD, num_kv_heads=6)
    for name in ("tp-sp", "ulysses", "odysseus", "ulysses+zero3"):
        flat, ring = Case(name, mha, 1, 120, 6, 0), Case(name, mha, 1, 60, 3, 0, ring=2)
        assert plan.attention_flops(ring) == pytest.approx(plan.attention_flops(flat))
        assert plan.block_cost(ring, hw, a).flops == pytest.approx(plan.block_cost(flat, hw, a).flops), name
    for name in ("ulysses", "ulysses+zero3"):
        flat, ring = Case(name, mha, 2, 120, 6, 5), Case(name, mha, 2, 60, 3, 2, ring=2)
        assert plan.saved_activation_bytes(ring) == plan.saved_activation_bytes(flat), name
        # GQA: sp 6 holds a kv head three times over all 120 tokens, sp 3 of the ring once over its 60: less.
        flat, ring = (dataclasses.replace(c, config=ODD) for c in (flat, ring))
        assert plan.saved_activation_bytes(ring) < plan.saved_activation_bytes(flat), name
    z_ring, z_flat = Case("ulysses+zero3", ODD, 1, 60, 3, 0, ring=2), Case("ulysses+zero3", ODD, 1, 120, 6, 0)
    assert ring_weight_numel(z_ring) == weight_numel(z_flat)
    # The ring sums the gradients over R: without ZeRO-3 every local gradient, with it only what FSDP2 leaves.
    (who, nbytes, count), *_ = ring_grad_records(Case("ulysses", ODD, 1, 60, 3, 0, ring=2), 1, 10, True)
    assert who == "finalize_grads" and count == 1 and nbytes > 0
    assert ring_grad_records(z_ring, 1, 10, True) == []  # Ulysses splits no weight: FSDP2 sums them all


def test_ring_memory_transients_by_hand():
    assert plan_ring.TILE == ops_ring_attention.TILE  # the planner's copy of the score tile
    case = Case("ulysses", ODD, 1, 20, 2, 0, ring=3)  # 20 tokens, 3 query heads, 1 kv head, hd 16
    # What comm/ring.py and ops/ring_attention.py allocate at step 0 (the diagonal block), as MemoryTracker
    # measured it (perf/memory.py's ring cases): both passes hold the 3 ring ranks' int64 token indices (the
    # causal mask is made a tile at a time and is gone by each peak); hops of K/V in bf16, one fp32 token of query
    # heads (Q), score tiles of 3 heads in fp32.
    kv, Q, T = 1280, 3 * 16 * 4, 20
    both = 3 * T * 8
    fwd, bwd = ring_transients(case)
    # Forward, one key tile: the fp32 running output and lse; K, V in fp32, the row's queries and, at the
    # exponent, three score tiles (scores, less their lse, exp) with the lse.
    assert fwd == both + 2 * kv + T * Q + 3 * T * 4 + 2 * T * Q + T * Q + 3 * (3 * T * T * 4) + 3 * T * 4
    # Backward, one key tile: dQ, K, V, dK, dV in fp32; the row tile (rows, output gradient, dQ tile, row dot,
    # lse); P and dS with dQ's einsum result and its scaled copy.
    assert bwd == both + 3 * kv + 5 * T * Q + (3 * T * Q + 2 * 3 * T * 4) + (2 * 3 * T * T * 4 + 2 * T * Q)
    # Past the 512 x 512 tile: at the second key tile's mask fill of the last full row tile (512 rows, 512
    # before it), the last tile's P and dS beside the new scores, their masked copy and the negated mask tile.
    kv, T = 1280 * 60, 1200
    row = 3 * 512 * Q + 2 * 3 * 512 * 4 + 512 * Q
    tiles = 2 * 3 * 512 * (512 + 512) * 4 + 512 * 512
    assert ring_transients(dataclasses.replace(case, seq=T))[1] == 3 * T * 8 + 3 * kv + 5 * T * Q + row + tiles
    peak = plan.block_peak(case)
    assert {"ring attention forward", "ring attention backward"} <= set(peak.moments)
    # Twice the ring ranks at the same tokens per ring rank: the same memory per rank.
    assert plan.block_peak(dataclasses.replace(case, ring=6)).bytes == peak.bytes


def test_the_ring_crosses_nodes_and_pays_the_nic():
    hw, a = get_hardware("h100-nvlink"), Assumptions()
    cfg = MODELS["llama3-8b"].config()
    inside, across = Case("ulysses", cfg, 1, 8192, 4, ring=2), Case("ulysses", cfg, 1, 8192, 8, ring=2)
    assert not crosses_nodes(inside, hw) and crosses_nodes(across, hw)
    ring_link = {}
    for case in (inside, across):
        base = plan.block_cost(dataclasses.replace(case, ring=1), hw, a).link_s
        hops = 1 + 3  # forward 1, backward 1 + 2
        ring_link[case.world] = (plan.block_cost(case, hw, a).link_s - base) / hops
    t_nvlink = hop_bytes(inside) / (hw.intra_node_bw * a.link_efficiency) + a.collective_latency_s
    t_nic = hop_bytes(across) / (hw.inter_node_bw * a.link_efficiency) + a.collective_latency_s
    assert ring_link[4] == pytest.approx(t_nvlink) and ring_link[8] == pytest.approx(t_nic)


def test_efficiency_curve_matches_the_cited_points_and_is_monotone():
    a = Assumptions()
    h100, a100 = get_hardware("h100-nvlink"), get_hardware("a100-nvlink")
    # The points read from arXiv:2407.08608's figures, returned at their sequence lengths.
    assert figure_tflops("fa2", "forward", True, 16384, 128) == 335
    assert figure_tflops("fa2", "backward", True, 512, 64) == 198
    assert figure_tflops("fa3", "forward", True, 2048, 128) == 521
    assert figure_tflops("fa3", "forward", False, 8192, 128) == 646
    for (kernel, phase, causal, hd), points in TFLOPS.items():
        for s, v in zip(SEQ, points):
            assert figure_tflops(kernel, phase, bool(causal), s, hd) == v
    # Between points: linear in log2(seq); past 16k held; below 512 held; head dim 96 halfway.
    assert figure_tflops("fa2", "forward", True, math.sqrt(2048 * 4096), 128) == pytest.approx((298 + 319) / 2)
    assert figure_tflops("fa2", "forward", True, 1 << 20, 128) == 335
    assert figure_tflops("fa2", "forward", True, 100, 128) == 191
    assert figure_tflops("fa2", "forward", True, 4096, 96) == pytest.approx((284 + 319) / 2)
    # Monotone where the figures are: in sequence length, and in head dim at every length.
    for kernel in ("fa2", "fa3"):
        for phase, causal in (("forward", True), ("forward", False), ("backward", True)):
            for hd in (64, 80, 96, 128):
                ys = [figure_tflops(kernel, phase, causal, 2 ** (k / 4), hd) for k in range(32, 60)]
                assert ys == sorted(ys), (kernel, phase, causal, hd)
            for s in (512, 3000, 16384):
                ys = [figure_tflops(kernel, phase, causal, s, hd) for hd in (64, 80, 96, 112, 128)]
                assert ys == sorted(ys)
    # H100 presets read the curve (fa2 by default, fa3 on request); A100 keeps the constant.
    assert attention_efficiency(h100, a, 16384, 128, "forward") == pytest.approx(335 / 989)
    fa3 = dataclasses.replace(a, attention_kernel="fa3")
    assert attention_efficiency(h100, fa3, 16384, 128, "backward") == pytest.approx(561 / 989)
    assert attention_efficiency(a100, a, 16384, 128, "forward") == a.attention_efficiency
    with pytest.raises(ValueError, match="attention_kernel='fa4'"):
        Assumptions(attention_kernel="fa4")
    with pytest.raises(ValueError, match="kernel='x'"):
        figure_tflops("x", "forward", True, 1024, 128)


def test_predict_ranks_ring_layouts_past_the_heads():
    preds = plan.predict("llama3-8b", 1 << 20, 64, "h100-nvlink", ring="auto", strategies=("ulysses+zero3", "tp-sp"))
    flat = [p for p in preds if p.ring == 1]
    assert flat and all(not p.feasible and "32 query heads" in p.note for p in flat)
    assert {p.ring for p in preds} == {1, 2, 4, 8, 16, 32, 64}  # sp = 64 / R <= 32 heads, R = 1 shown failing
    win = preds[0]
    assert win.rank == 1 and win.ring > 1 and win.ring * win.sp == 64 and "ring" in win.label
    assert win.tokens_per_s_per_gpu == pytest.approx((1 << 20) / (win.step_s * 64))
    with pytest.raises(ValueError, match="ring=3 does not divide gpus=64"):
        plan.predict("llama3-8b", 1 << 20, 64, "h100-nvlink", ring=3)
    with pytest.raises(ValueError, match="does not cut into 2 x ring = 16 equal chunks"):
        plan.predict("llama3-8b", 1000, 8, "h100-nvlink", ring=8)


def test_max_seq_searches_the_ring_degree():
    hw, a, model = get_hardware("h100-nvlink"), Assumptions(), MODELS["llama3-8b"]
    past = plan.max_seq(model, 64, hw, strategies=("ulysses+zero3",), offload=False, ring=None)
    (row,) = past
    assert row.ring > 1 and row.seq > 0 and row.seq % (2 * 64) == 0, row
    S = 64 // row.ring
    for seq, fits in ((row.seq, True), (row.seq + 2 * 64, False)):
        case = Case("ulysses+zero3", model.config(), 1, seq // row.ring, S, 0, 2, row.save_input, ring=row.ring)
        mem = [plan.memory_bytes(model, case.at(k), a, row.options, "symm") for k in (0, S - 1)]
        assert all(m["total"] <= hw.memory_bytes * a.usable_memory_fraction for m in mem) == fits
    (flat,) = plan.max_seq(model, 64, hw, strategies=("ulysses+zero3",), offload=False, ring=1)
    assert flat.seq == 0 and "32 query heads" in flat.binding
    # The search includes R = 1: it never finds less than R = 1 alone.
    (r1,) = plan.max_seq(model, 4, hw, strategies=("tp-sp",), offload=False)  # ring=1: the default
    (any_r,) = plan.max_seq(model, 4, hw, strategies=("tp-sp",), offload=False, ring=None)
    assert any_r.seq >= r1.seq and any_r.ring in (1, 2, 4)
    # TP holds the whole sequence: never on a ring (the modules refuse a ring mesh for it), searched at R = 1 only.
    (tp_any,) = plan.max_seq(model, 4, hw, strategies=("tp",), offload=False, ring=None)
    assert tp_any.ring == 1 and tp_any.seq > 0
    (tp_ring,) = plan.max_seq(model, 4, hw, strategies=("tp",), offload=False, ring=2)
    assert tp_ring.seq == 0 and "needs a sequence-split strategy" in tp_ring.binding
    (pred,) = plan.predict("llama3-8b", 1 << 16, 8, "h100-nvlink", ring=2, strategies=("tp",))
    assert not pred.feasible and "needs a sequence-split strategy" in pred.note
    with pytest.raises(ValueError, match="ring=3 must be a positive int dividing gpus=4"):
        plan.max_seq(model, 4, hw, ring=3, offload=False)


def test_cli_ring(capsys):
    cli.main(["--model", "llama3-8b", "--seq", "65536", "--sp", "4", "--ring", "2", "--hardware", "h100-nvlink"])
    out = capsys.readouterr().out
    assert "over 8 (ring 2 x sp 4) x h100-nvlink" in out and "| 2 x 4 |" in out and "winner:" in out
    cli.main(["--model", "llama3-8b", "--seq", "65536", "--gpus", "8", "--ring", "auto"])
    out = capsys.readouterr().out
    assert all(f"| {r} x {8 // r} |" in out for r in (1, 2, 4, 8))
    cli.main(["--model", "llama3-8b", "--gpus", "8", "--max-seq", "--no-offload", "--ring", "2"])
    out = capsys.readouterr().out
    assert "| ulysses+zero3 | 2 |" in out and "| tp | 2 |" in out
    for argv, msg in (
        (["--seq", "65536", "--gpus", "8", "--ring", "0"], "--ring '0': expected a positive int"),
        (["--seq", "65536", "--gpus", "8", "--ring", "two"], "--ring 'two': expected a positive int"),
        (["--seq", "65536", "--gpus", "8", "--ring", "3"], "--ring 3 does not divide --gpus 8"),
        (["--seq", "65536", "--sp", "8", "--ring", "auto"], "--ring auto searches the sp size"),
        (["--gpus", "8", "--ring", "auto", "--max-seq"], "--max-seq searches the ring degree itself"),
        (["--seq", "1000", "--gpus", "8", "--ring", "8"], "seq=1000 does not cut into 2 x ring = 16 equal chunks"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["--model", "llama3-8b", *argv])
        assert msg in capsys.readouterr().err, argv
