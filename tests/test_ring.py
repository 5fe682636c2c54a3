"""The ring dim: ring attention under Ulysses, Odysseus and TP-SP on ("ring", "sp") and ("dp", "ring", "sp")
meshes against the dense fp64 block (output, input gradient, every weight gradient, the clipping norm), with
and without ZeRO-3; the merge op alone; the load-balanced layout; the ledger's ring hops against their closed
form; packed documents across ring chunks, bf16 autocast, checkpointing; and the refusals of bad meshes."""

import math

import pytest
import torch
import torch.distributed as dist
from helpers import ODD, assert_close, assert_low_precision_within, make_block, run_reference
from multirank import run_ranks

import odysseus
from odysseus import CommLedger, dense_state_dict, finalize_grads, gather_sequence, shard_sequence
from odysseus.comm.mesh import resolve_mesh
from odysseus.layout import ring_chunks, ring_shards
from odysseus.ops import ring_attention
from odysseus.ops.ring_attention import block_backward, block_forward, merge, plan_block
from odysseus.parity import Run
from odysseus.plan import Case, expected_collectives
from odysseus.plan.forms import ring_collectives, ring_tokens_per_rank
from odysseus.strategies import registry

TOL = dict(rtol=1e-9, atol=1e-9, scaled=True)
L = 61  # odd everywhere (ODD: hidden 96, 6 heads, 2 kv heads, FFN 160)
# Packed documents of 20, 32 and 9 tokens: the 2- and 3-rings cut the first two across their chunks.
PACKED = torch.cat([torch.arange(20), torch.arange(32), torch.arange(9)])[None]


def test_ring_layout_covers_every_token_once_and_balances_causal_work():
    for n, R, S in [(61, 2, 2), (61, 3, 2), (64, 4, 1), (13, 2, 3), (7, 3, 1)]:
        shards = ring_shards(n, R, S)
        tokens = sorted(t for ranges in shards for s, e in ranges for t in range(s, e))
        assert tokens == list(range(n)), (n, R, S)
        # Causal work of a ring rank: the keys each of its queries sees. Head + tail chunks even it out.
        work = [sum(t + 1 for s, e in chunks for t in range(s, e)) for chunks in ring_chunks(n, R)]
        chunk = -(-n // (2 * R))
        assert max(work) - min(work) <= 2 * chunk * chunk + n, (n, R, work)
    contiguous = [sum(range(i * 16 + 1, i * 16 + 17)) for i in range(4)]  # what a plain split of 64 over 4 gives
    balanced = [sum(t + 1 for s, e in c for t in range(s, e)) for c in ring_chunks(64, 4)]
    assert max(balanced) / min(balanced) < 1.1 < max(contiguous) / min(contiguous)


def _dense_attention(q, k, v, kv_of_q, docs):
    ke, ve = k.index_select(2, kv_of_q), v.index_select(2, kv_of_q)
    s = torch.einsum("bqhd,bkhd->bhqk", q, ke) / math.sqrt(q.shape[-1])
    n = q.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None] & (docs[:, :, None] == docs[:, None, :])
    return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~mask[:, None], float("-inf")).softmax(-1), ve)


@pytest.mark.parametrize("tile", [4, 1024])
def test_blocks_merged_by_lse_match_dense_attention_numerics(tile, monkeypatch):
    """Three ring ranks' blocks, uneven GQA (query heads reading kv heads 0, 0, 1), packed documents that leave
    some query rows of a block with no key: forward and every gradient equal dense attention in fp64, the scores
    computed a few query rows at a time or all at once."""
    monkeypatch.setattr(ring_attention, "TILE", tile)
    g = torch.Generator().manual_seed(0)
    n, B, D = 23, 2, 4
    q = torch.randn(B, n, 3, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, n, 2, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, n, 3, D, generator=g, dtype=torch.float64)
    kv_of_q = torch.tensor([0, 0, 1])
    pos = torch.stack([torch.cat([torch.arange(9), torch.arange(14)]), torch.cat([torch.arange(4), torch.arange(19)])])
    docs = (pos == 0).long().cumsum(-1)
    want = _dense_attention(q, k, v, kv_of_q, docs)
    want.backward(dout)
    tokens = [torch.cat([torch.arange(s, e) for s, e in c]) for c in ring_chunks(n, 3)]
    mine = tokens[1]
    qm, om = q.detach()[:, mine], dout[:, mine]
    out = lse = None
    blocks = []
    for src in (1, 0, 2):  # the order ring rank 1 meets the blocks in
        blk = plan_block(mine, tokens[src], True, docs[:, mine], docs[:, tokens[src]])
        ks, vs = k.detach()[:, tokens[src]], v.detach()[:, tokens[src]]
        if not blk.empty:
            lo, hi = blk.q_lo, blk.k_hi
            o, s = block_forward(qm[:, lo:], ks[:, :hi], vs[:, :hi], blk.mask, D**-0.5, kv_of_q)
            full_o, full_s = torch.zeros_like(qm), torch.full((B, 3, len(mine)), float("-inf"), dtype=torch.float64)
            full_o[:, lo:], full_s[..., lo:] = o, s
            out, lse = merge(out, lse, full_o, full_s)
        blocks.append((src, blk, ks, vs))
    assert_close(out, want.detach()[:, mine], **TOL, what="merged output")
    # Only ring rank 1's queries contribute to its blocks' dK/dV: their share of the dense gradient.
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    share = torch.zeros_like(dout)
    share[:, mine] = dout[:, mine]
    _dense_attention(q1, k1, v1, kv_of_q, docs).backward(share)
    dq = torch.zeros_like(qm)
    for src, blk, ks, vs in blocks:
        if blk.empty:
            continue
        lo, hi = blk.q_lo, blk.k_hi
        gq, gk, gv = block_backward(
            om[:, lo:], qm[:, lo:], ks[:, :hi], vs[:, :hi], out[:, lo:], lse[..., lo:], blk.mask, D**-0.5, kv_of_q
        )
        dq[:, lo:] += gq
        for got, dense, name in ((gk, k1.grad, "dk"), (gv, v1.grad, "dv")):
            assert_close(got, dense[:, tokens[src]][:, :hi], **TOL, what=f"{name} of block {src}")
        dense_rest = torch.cat([k1.grad, v1.grad])[:, tokens[src]][:, hi:]
        assert not dense_rest.any(), f"block {src}: keys past k_hi={hi} have a gradient but were skipped"
    assert_close(dq, q.grad[:, mine], **TOL, what="dq")


# --- whole blocks on meshes with a ring ------------------------------------------------------------------------


def _mesh(shape, names):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _check_ledger(led, config, strategy, mesh, batch, dtype_bytes):
    """The ring's records equal their closed form in order; the sp part's equal the strategy's forms on the ring
    rank's tokens."""
    R, S = mesh.ring_size, dist.get_world_size(mesh.sp)
    i, s = 0 if mesh.ring is None else dist.get_rank(mesh.ring), dist.get_rank(mesh.sp)
    got = [(r.phase, r.op, r.label, r.bytes_sent, r.bytes_received) for r in led.select(dim="ring", op="send_recv")]
    want = [
        (c.phase, c.op, c.label, c.bytes_sent, c.bytes_received)
        for c in ring_collectives(config, batch, L, R, S, i, s, dtype_bytes)
    ]
    assert got == want, (got, want)
    T = ring_tokens_per_rank(L, R)[i]
    forms = expected_collectives(
        Case(registry.Variant(registry.get(strategy), False), config, batch, T, S, s, dtype_bytes)
    )
    sp_want = sorted((c.phase, c.op, c.label, c.bytes_received) for c in forms if c.category == "activation")
    sp_got = sorted(
        (r.phase, r.op, r.label, r.bytes_received)
        for r in led.select(dim="sp", category="activation")
        if r.label != "shard_sequence"
    )
    assert sp_got == sp_want, (sp_got, sp_want)


def _parity(rank, world, shape, names, cases):
    """Every case (strategy, ZeRO-3 shard mode or None, packed, options: True for checkpoint=True, or the
    keyword arguments of parallelize) against the dense fp64 block on the
    replicas' batches concatenated; the ledger too where there is no ZeRO-3."""
    mesh_arg = _mesh(shape, names)
    mesh = resolve_mesh(mesh_arg)
    d = dist.get_rank(mesh.dp) if mesh.dp is not None else 0
    replicas = shape[0] if names[0] == "dp" else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(replicas, L, 96, generator=g, dtype=torch.float64)
    gy = torch.randn(replicas, L, 96, generator=g, dtype=torch.float64)
    mine = slice(d, d + 1)
    done = []
    for strategy, shard, packed, options in cases:
        options = {"checkpoint": True} if options is True else options or {}
        what = f"{strategy} {shape} zero3={shard} packed={packed} {options}"
        ref = make_block(torch.float64, **ODD)
        pos = PACKED if packed else None
        want = run_reference(ref, x, gy, pos)
        want_norm = torch.cat([t.flatten() for t in want.grads.values()]).norm()
        par = odysseus.parallelize(ref, strategy, mesh_arg, **options)
        if shard is not None:
            odysseus.zero3(par, shard=shard)
        xp = x[mine].clone().requires_grad_()
        args = () if pos is None else (shard_sequence(pos, mesh_arg),)
        with CommLedger() as led:
            y = par(shard_sequence(xp, mesh_arg), *args)
            (y * shard_sequence(gy[mine], mesh_arg)).sum().backward()
        finalize_grads(par)
        if shard is None and not options:
            _check_ledger(led, ref.config, strategy, mesh, 1, 8)
        ours = Run(gather_sequence(y.detach(), mesh_arg), xp.grad, dense_state_dict(par, grad=True))
        assert_close(ours.output, want.output[mine], **TOL, what=f"{what} output")
        assert_close(ours.input_grad, want.input_grad[mine], **TOL, what=f"{what} x.grad")
        assert set(ours.grads) == set(want.grads)
        for k, v in want.grads.items():
            assert_close(ours.grads[k], v, **TOL, what=f"{what} {k}.grad")
        norm = odysseus.clip_grad_norm_(par, max_norm=1e9)
        assert_close(norm, want_norm, 1e-9, 0, what=f"{what} grad norm")
        done.append(what)
    return done


def _run(shape, names, cases, timeout=300):
    done = run_ranks(math.prod(shape), _parity, shape, names, cases, timeout=timeout)
    assert all(d == done[0] for d in done) and len(done[0]) == len(cases), done


def test_ring2_sp2_every_strategy_with_and_without_zero3_numerics():
    cases = [(s, z, False, False) for s in ("ulysses", "odysseus", "tp-sp") for z in (None, "sp")]
    tiled = ("odysseus", None, False, dict(checkpoint=True, offload=True, ffn_tile=9))
    _run((2, 2), ("ring", "sp"), cases + [("odysseus", None, True, False), ("ulysses", None, False, True), tiled])


def test_pure_ring_of_three_numerics():
    """``ring`` alone (sp of size 1): context parallelism; packed documents straddle the ring chunks."""
    _run((3, 1), ("ring", "sp"), [("ulysses", None, True, False), ("tp-sp", "sp", False, False)])


def test_dp2_ring2_sp1_numerics():
    cases = [("odysseus", None, False, False), ("ulysses", "hybrid", False, False), ("tp-sp", "full", True, False)]
    _run((2, 2, 1), ("dp", "ring", "sp"), cases)


def test_a_ring_of_one_is_the_sp_mesh_numerics():
    """(dp 2, ring 1, sp 2): no ring at all (local attention, the sp layout), every ZeRO-3 mode still right."""
    cases = [("odysseus", z, False, False) for z in ("sp", "hybrid", "full")] + [("ulysses", None, True, False)]
    _run((2, 1, 2), ("dp", "ring", "sp"), cases)


@pytest.mark.parametrize("shape, strategy", [((3, 2), "ulysses"), ((2, 3), "odysseus")])
def test_world6_numerics(shape, strategy):
    _run(shape, ("ring", "sp"), [(strategy, None, True, False)], timeout=600)


def _autocast(rank, world):
    mesh = _mesh((2, 2), ("ring", "sp"))
    g = torch.Generator().manual_seed(2)
    x, gy = torch.randn(1, L, 96, generator=g), torch.randn(1, L, 96, generator=g)
    truth = run_reference(make_block(torch.float64, **ODD), x.double(), gy.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = run_reference(make_block(**ODD), x, gy)
        par = odysseus.parallelize(make_block(**ODD), "odysseus", mesh)
        xp = x.clone().requires_grad_()
        y = par(shard_sequence(xp, mesh))
        (y.float() * shard_sequence(gy, mesh)).sum().backward()
    finalize_grads(par)
    ours = Run(gather_sequence(y.detach().float(), mesh), xp.grad, dense_state_dict(par, grad=True))
    return assert_low_precision_within(ours, base, truth, "bf16 autocast ring", factor=3, slack=2e-3)


def test_bf16_autocast_ring_is_as_close_as_the_dense_block_numerics():
    errors = run_ranks(4, _autocast)
    assert all(max(e.values())[0] < 0.1 for e in errors), errors


# --- refusals --------------------------------------------------------------------------------------------------


def _refusals(rank, world):
    from odysseus import TransformerConfig
    from odysseus.reference import TransformerBlock

    errors = []

    def expect(kind, phrase, call):
        with pytest.raises(kind) as info:
            call()
        assert phrase in str(info.value), f"{info.value!r} lacks {phrase!r}"
        errors.append(str(info.value))

    ref = make_block(**ODD)
    expected = "expected dims named ('dp', 'sp') (either order), ('ring', 'sp') or ('dp', 'ring', 'sp')"
    for shape, names in (
        ((2, 2), ("sp", "ring")),
        ((2, 2), ("ring", "dp")),
        ((2, 2), ("a", "b")),
        ((1, 2, 2), ("ring", "dp", "sp")),
    ):
        bad = _mesh(shape, names)
        expect(ValueError, expected, lambda bad=bad: odysseus.parallelize(ref, "odysseus", bad))
    expect(ValueError, "a 1-D mesh is the group", lambda: odysseus.parallelize(ref, "ulysses", _mesh((4,), ("dp",))))
    ring = _mesh((2, 2), ("ring", "sp"))
    expect(
        ValueError, "use 'tp-sp', 'ulysses' or 'odysseus' with a ring", lambda: odysseus.parallelize(ref, "tp", ring)
    )
    one_head = TransformerBlock(TransformerConfig(hidden_size=16, num_heads=1, num_kv_heads=1, intermediate_size=32))
    expect(
        ValueError,
        "cannot split num_heads=1 over world size 2",
        lambda: odysseus.parallelize(one_head, "ulysses", ring),
    )
    # The ring ranks fed shards of different sequences: the lengths do not form the ring layout, on every rank.
    par = odysseus.parallelize(ref, "ulysses", ring)
    mesh = resolve_mesh(ring)
    n = 61 if dist.get_rank(mesh.ring) == 0 else 41
    expect(
        ValueError, "the ring ranks hold [61, 41] tokens", lambda: par(shard_sequence(torch.randn(1, n, 96), mesh.sp))
    )
    expect(ValueError, "shard_sequence(x, mesh)", lambda: par(shard_sequence(torch.randn(1, n, 96), mesh.sp)))
    # Shards over sp alone of a sequence whose ring layout has the same lengths (64 = 4 chunks of 16): every ring
    # rank holds the same tokens. The lengths cannot tell; the default input check compares the ring ranks' inputs.
    checked = odysseus.parallelize(ref, "odysseus", ring)
    same = shard_sequence(torch.randn(1, 32, 96, generator=torch.Generator().manual_seed(0)), mesh.sp)
    expect(ValueError, "every ring rank holds the same input", lambda: checked(same))
    return errors


def test_bad_meshes_and_inputs_raise_on_every_rank():
    for errors in run_ranks(4, _refusals, timeout=120):
        assert len(errors) == 10, errors


def _gather_dual(rank, world):
    mesh = _mesh((3, 2), ("ring", "sp"))
    w = torch.randn(2, 37, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mine = shard_sequence(w, mesh).clone().requires_grad_()
    whole = gather_sequence(mine, mesh)
    assert torch.equal(whole, w)
    (whole * w).sum().backward()  # every rank's loss covers the whole sequence: the sum over the 6 ranks
    assert_close(mine.grad, 6 * shard_sequence(w, mesh), 1e-12, 0, what="gather_sequence backward")
    return True


def test_shard_and_gather_sequence_undo_each_other_with_their_duals():
    assert all(run_ranks(6, _gather_dual))


# --- Hugging Face: parallelize_llama on a ring mesh against the dense model ------------------------------------


def _hf(rank, world):
    from test_hf_models import batch, build, family_config

    from odysseus.integrations.hf import (
        causal_lm_loss,
        finalize_model_grads,
        global_loss,
        hf_state_dict,
        model_loss,
        parallelize_llama,
    )

    mesh = _mesh((2, 2), ("ring", "sp"))
    ids, labels = batch()
    done = []
    for family, strategy, packed, checkpoint in (("llama", "ulysses", False, False), ("qwen2", "odysseus", True, True)):
        what = f"{family} {strategy} packed={packed} checkpoint={checkpoint}"
        ref = build(family_config(family))
        pos = PACKED.expand(2, -1) if packed else None
        out = ref(ids, labels=labels, position_ids=pos, use_cache=False)
        out.loss.backward()
        model = parallelize_llama(build(family_config(family)), strategy, mesh, checkpoint=checkpoint)
        kwargs = {} if pos is None else {"position_ids": shard_sequence(pos, mesh)}
        if checkpoint:  # the loss a chunk at a time, never the logits
            loss = model_loss(model, shard_sequence(ids, mesh), labels, chunk=7, **kwargs)
        else:
            logits = model(shard_sequence(ids, mesh), **kwargs).logits
            loss = causal_lm_loss(logits, labels, mesh)
            assert_close(gather_sequence(logits.detach(), mesh), out.logits, 1e-5, 1e-5, True, f"{what} logits")
        loss.backward()
        finalize_model_grads(model)
        assert_close(global_loss(loss, model), out.loss, 1e-5, 1e-5, True, f"{what} loss")
        grads = hf_state_dict(model, grad=True)
        for name, p in ref.named_parameters():
            assert_close(grads[name], p.grad, 1e-5, 1e-5, True, f"{what} {name}.grad")
        done.append(what)
    return done


def test_hf_llama_and_qwen2_on_a_ring_mesh_match_dense_numerics():
    done = run_ranks(4, _hf, timeout=300)
    assert all(len(d) == 2 for d in done), done


def _train(rank, world, flags):
    from test_train_example import _example

    example = _example()
    return example.train(example.parse_args(flags))


def test_train_example_with_a_ring_trains_as_without():
    """examples/train_llama.py --ring 2 --sp 2 (ZeRO-3 over ring x sp) takes the same steps as --sp 2 alone."""
    from test_train_example import SIZES

    flags = [*SIZES, "--steps", "3", "--save-every", "0", "--strategy", "ulysses", "--zero3", "--seq", "61"]
    ring = run_ranks(4, _train, [*flags, "--ring", "2", "--sp", "2"], timeout=300)
    flat = run_ranks(2, _train, [*flags, "--sp", "2"], timeout=300)
    assert all(losses == ring[0] for losses in ring)
    assert_close(torch.tensor(ring[0]), torch.tensor(flat[0]), 1e-5, 0, what="losses of --ring 2 vs none")
    assert ring[0][-1] < ring[0][0], ring[0]


# --- memory: a ring rank keeps O(L / (R * S)) ------------------------------------------------------------------


def _peaks(rank, world, lengths):
    from odysseus.reference import Attention
    from odysseus.training.memtrack import MemoryTracker

    ring_attention.TILE = 32  # transients of a fixed size: what is left grows with the tokens a rank holds
    mesh = _mesh((world, 1), ("ring", "sp"))
    par = odysseus.parallelize(Attention(odysseus.TransformerConfig(**ODD)), "ulysses", mesh)
    peaks = []
    for n in lengths:
        x = shard_sequence(torch.randn(1, n, 96), mesh).requires_grad_()
        with MemoryTracker() as mem:
            y = par(x)
            y.backward(torch.ones_like(y))
        peaks.append(mem.peak_bytes)
    return peaks


def test_a_ring_rank_holds_activations_of_its_own_tokens_only():
    """The peak of one attention's forward + backward on a rank halves when the ring doubles and doubles with
    the sequence: nothing of the whole sequence's length (no gathered K/V, no L x L scores) is held."""
    two = max(run_ranks(2, _peaks, [256, 512]), key=lambda p: p[0])
    four = max(run_ranks(4, _peaks, [256]))[0]
    assert 1.7 < two[1] / two[0] < 2.3, two
    assert 0.4 < four / two[0] < 0.65, (four, two)


def _snippet(rank, world, source):
    exec(compile(source, "README.md ring snippet", "exec"), {"__name__": "readme_ring_snippet"})
    return True


def test_readme_ring_snippet_runs_at_world_4():
    from test_readme_snippets import snippets

    (source,) = snippets("## Past the head count, across nodes")
    assert all(run_ranks(4, _snippet, source, timeout=120))


def _harness(rank, world):
    from odysseus.parity import relative_errors, run_parallel

    mesh = _mesh((2, 2), ("ring", "sp"))
    ref = make_block(torch.float64, **ODD)
    g = torch.Generator().manual_seed(3)
    x, gy = (torch.randn(1, 64, 96, generator=g, dtype=torch.float64) for _ in range(2))  # 64: 4 even chunks
    want = run_reference(ref, x, gy)
    return max(relative_errors(run_parallel(odysseus.parallelize(ref, "tp-sp", mesh), x, gy), want).values())


def test_parity_harness_lays_the_sequence_out_over_the_ring():
    assert max(run_ranks(4, _harness)) < 1e-12
