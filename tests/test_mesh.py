"""A 2-D mesh, data-parallel x sequence-parallel: every strategy, with and without each ZeRO-3 mode, against the
dense block on the replicas' batches concatenated (output, input gradient, every weight gradient, the clipping
norm); the CommLedger's bytes per mesh dim against the closed forms; the mesh's forms and their refusals; a
rank failing in one replica."""

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import ODD, assert_close, make_block, run_reference
from multirank import run_ranks

import odysseus
from odysseus import STRATEGIES, CommLedger, dense_state_dict, finalize_grads, gather_sequence, shard_sequence
from odysseus.comm.mesh import resolve_mesh
from odysseus.plan import Case, Collective, expected_collectives
from odysseus.plan.data_parallel import dp_collectives
from odysseus.strategies import registry

TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)
B, L = 1, 61  # per replica; odd sizes everywhere (ODD: hidden 96, 6 heads, 2 kv heads, FFN 160)


def build_mesh(kind: str, dp: int, sp: int, timeout_s: float | None = None):
    """The (dp, sp) mesh of this rank in one of the accepted forms; ranks are laid out dp-major.

    ``device_mesh``: init_device_mesh with dims ("dp", "sp"); ``reversed``: a DeviceMesh whose dims are
    ("sp", "dp"), so the sp groups are strided; ``pair``: a (dp_group, sp_group) pair of new groups (with
    ``timeout_s``, which init_device_mesh cannot take: its groups wait 30 minutes)."""
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "device_mesh":
        return init_device_mesh("cpu", (dp, sp), mesh_dim_names=("dp", "sp"))
    if kind == "reversed":
        return init_device_mesh("cpu", (sp, dp), mesh_dim_names=("sp", "dp"))
    layout = torch.arange(dp * sp).view(dp, sp)
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    me = dist.get_rank()
    mine = {}
    for name, rows in (("sp", layout.tolist()), ("dp", layout.t().tolist())):
        for ranks in rows:  # every rank creates every group, in the same order
            pg = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine[name] = pg
    return (mine["dp"], mine["sp"])


def modes(strategy: str) -> list:
    """No ZeRO-3, then each shard mode where the strategy holds replicated weights (TP holds none)."""
    return [None] + (["sp", "hybrid", "full"] if registry.get(strategy).sequence_split else [])


def check_ledger_dims(led: CommLedger, strategy, shard, config, sp, sp_rank, dp, dp_rank) -> None:
    """Every non-metadata record sits on a mesh dim, and each dim's records equal its closed form."""
    # Built directly: the planner's names leave out tp-sp+zero3 (only its norms are sharded), the library has it.
    variant = registry.Variant(registry.get(strategy), shard is not None)
    case = Case(variant, config, B, L, sp, sp_rank, 4)
    want = {"sp": expected_collectives(case), "dp": dp_collectives(case, dp, dp_rank, shard)}
    for dim, expected in want.items():
        got = [
            Collective(r.phase, r.op, r.category, r.label, r.bytes_sent, r.bytes_received)
            for r in led.select(dim=dim)
            if r.category != "metadata"
        ]
        assert sorted(got) == sorted(expected), f"{variant.name} {dim}: {sorted(got)}\nformula {sorted(expected)}"
        assert all(r.group_size == (sp if dim == "sp" else dp) for r in led.select(dim=dim))
    assert not [r for r in led.records if r.dim not in ("sp", "dp")], "a collective on neither mesh dim"


def check_placements(par, shard, sp: int, dp: int) -> None:
    """The sharded parameters are DTensors on the mesh the mode asks for."""
    sharded = [p for p in par.parameters() if hasattr(p, "placements")]
    assert bool(sharded) == (shard is not None)
    for p in sharded:
        kinds = tuple(type(x).__name__ for x in p.placements)
        want = {"sp": (("Shard",), sp), "full": (("Shard",), sp * dp), "hybrid": (("Replicate", "Shard"), sp * dp)}
        assert (kinds, p.device_mesh.size()) == want[shard], (shard, kinds, p.device_mesh.size())


def _parity(rank, world, kind, dp, sp):
    mesh_arg = build_mesh(kind, dp, sp)
    mesh = resolve_mesh(mesh_arg)
    r_dp, r_sp = dist.get_rank(mesh.dp), dist.get_rank(mesh.sp)
    ref = make_block(torch.float32, **ODD)
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(dp * B, L, 96, generator=g), torch.randn(dp * B, L, 96, generator=g)
    want = run_reference(ref, x, gy)  # the dense block on every replica's batch, concatenated
    want_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    mine = slice(r_dp * B, (r_dp + 1) * B)  # this replica's batch
    done = []
    for strategy in STRATEGIES:
        split = registry.get(strategy).sequence_split
        for shard in modes(strategy):
            what = f"{strategy} zero3={shard} on {kind} {dp}x{sp}"
            par = odysseus.parallelize(ref, strategy, mesh_arg)
            if shard:
                odysseus.zero3(par, mesh_arg, shard=shard)
            xp = (shard_sequence(x[mine], mesh_arg) if split else x[mine].clone()).requires_grad_()
            with CommLedger() as led:
                y = par(xp)
                (y * (shard_sequence(gy[mine], mesh_arg) if split else gy[mine])).sum().backward()
                finalize_grads(par)
            check_ledger_dims(led, strategy, shard, ref.config, sp, r_sp, dp, r_dp)
            check_placements(par, shard, sp, dp)
            out = gather_sequence(y.detach(), mesh_arg) if split else y.detach()
            assert_close(out, want.output[mine], **TOL, what=f"{what} output")
            x_grad = gather_sequence(xp.grad, mesh_arg) if split else xp.grad
            assert_close(x_grad, want.input_grad[mine], **TOL, what=f"{what} x.grad")
            grads = dense_state_dict(par, grad=True)
            assert set(grads) == set(want.grads)
            for k, v in want.grads.items():
                assert_close(grads[k], v, **TOL, what=f"{what} {k}.grad")
            # The dense norm over the whole mesh, the same on every rank; clipping scales every gradient by it.
            norm = odysseus.clip_grad_norm_(par, max_norm=0.5 * want_norm.item())
            assert_close(norm, want_norm, 1e-5, 0, what=f"{what} grad norm")
            clipped = dense_state_dict(par, grad=True)
            for k, v in want.grads.items():
                assert_close(clipped[k], v * (0.5 * want_norm / (want_norm + 1e-6)), **TOL, what=f"{what} {k} clip")
            done.append(what)
    return done


@pytest.mark.parametrize("kind, dp, sp", [("device_mesh", 2, 2), ("pair", 2, 3), ("reversed", 3, 2)])
def test_2d_mesh_parity_every_strategy_and_zero3_mode_numerics(kind, dp, sp):
    done = run_ranks(dp * sp, _parity, kind, dp, sp, timeout=600)
    assert all(d == done[0] for d in done) and len(done[0]) == 1 + 3 * 4, done[0]


# --- Hugging Face: parallelize_llama on a mesh, causal_lm_loss over every replica's batch ---------------------


def _llama(rank, world, kind, long_seq=False):
    from test_hf_numerics import batch, tiny_llama

    from odysseus.integrations.hf import (
        causal_lm_loss,
        finalize_model_grads,
        global_loss,
        hf_state_dict,
        model_loss,
        parallelize_llama,
    )

    mesh_arg = build_mesh(kind, 2, 2)
    r_dp = dist.get_rank(resolve_mesh(mesh_arg).dp)
    ids, labels = batch()  # two rows with different ignored positions: the replicas count different targets
    ref = tiny_llama()
    out_ref = ref(ids, labels=labels)  # the dense model on both rows: the mean over all their targets
    out_ref.loss.backward()
    mine = slice(r_dp, r_dp + 1)  # replica i trains on row i
    done = []
    for strategy in STRATEGIES:
        split = registry.get(strategy).sequence_split
        for shard in [None, "hybrid"] if registry.get(strategy).replicated else [None]:
            what = f"{strategy} zero3={shard}"
            # long_seq: checkpointed layers, tiled FFN, and the loss a chunk at a time (no logits to compare)
            options = dict(checkpoint=True, ffn_tile=9) if long_seq else {}
            model = parallelize_llama(tiny_llama(), strategy, mesh_arg, **options)
            if shard:
                odysseus.zero3(model, shard=shard)
            x = shard_sequence(ids[mine], mesh_arg) if split else ids[mine]
            if long_seq:
                loss = model_loss(model, x, labels[mine], chunk=7)
            else:
                logits = model(x).logits
                loss = causal_lm_loss(logits, labels[mine], mesh_arg)
                full = gather_sequence(logits.detach(), mesh_arg) if split else logits.detach()
                assert_close(full, out_ref.logits[mine], **TOL, what=f"{what} logits")
            loss.backward()
            finalize_model_grads(model)
            assert_close(global_loss(loss, model), out_ref.loss, **TOL, what=f"{what} loss")
            grads = hf_state_dict(model, grad=True)
            for name, p in ref.named_parameters():
                assert_close(grads[name], p.grad, **TOL, what=f"{what} {name}.grad")
            done.append(what)
    return done


def test_llama_on_a_2d_mesh_matches_the_dense_model_on_both_batches_numerics():
    done = run_ranks(4, _llama, "device_mesh", timeout=600)
    assert done[0] == done[3] and len(done[0]) == 6, done[0]


def test_llama_long_sequence_options_on_a_2d_mesh_numerics():
    """model_loss counts every replica's targets, as causal_lm_loss does, with checkpointed, tiled layers."""
    done = run_ranks(4, _llama, "device_mesh", True, timeout=600)
    assert done[0] == done[3] and len(done[0]) == 6, done[0]


# --- the mesh's forms and their refusals ---------------------------------------------------------------------


def _refusals(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    ref = make_block(**ODD)
    errors = []

    def expect(kind, phrase, call):
        with pytest.raises(kind) as info:
            call()
        assert phrase in str(info.value), f"{info.value!r} lacks {phrase!r}"
        errors.append(str(info.value))

    unnamed = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rows", "cols"))
    expect(ValueError, "expected dims named ('dp', 'sp') (either order), ('ring', 'sp')", lambda: resolve_mesh(unnamed))
    everything = dist.new_group([0, 1, 2, 3])
    sp_of = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    sp = [g for ranks in ([0, 1], [2, 3]) for g in [dist.new_group(ranks)] if rank in ranks][0]
    expect(ValueError, "must share this rank", lambda: odysseus.parallelize(ref, "odysseus", (everything, sp)))
    expect(TypeError, "pair of ProcessGroups", lambda: odysseus.parallelize(ref, "odysseus", (sp, 3)))
    one_d = odysseus.parallelize(ref, "odysseus", sp)
    expect(ValueError, "needs a 2-D (dp, sp) mesh", lambda: odysseus.zero3(one_d, shard="hybrid"))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    two_d = odysseus.parallelize(ref, "odysseus", mesh)
    expect(ValueError, "unknown shard='dp'", lambda: odysseus.zero3(two_d, shard="dp"))
    expect(ValueError, "differs from the one", lambda: odysseus.zero3(two_d, sp))
    assert dist.get_process_group_ranks(two_d.pg) == sp_of[rank]
    # DDP over the mesh's dp group (the recipe before the mesh was supported) would reduce the gradients twice.
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapped = DDP(two_d, process_group=mesh.get_group("dp"))
    x = shard_sequence(torch.randn(1, L, 96), mesh)
    expect(ValueError, "would reduce them twice", lambda: wrapped(x))
    return errors


def test_bad_meshes_are_refused_with_what_was_expected():
    for errors in run_ranks(4, _refusals, timeout=120):
        assert len(errors) == 7, errors


def _default_group_on_a_mesh_model(rank, world):
    from odysseus.integrations.hf import causal_lm_loss, lm_head_loss

    ids = torch.randint(0, 50, (1, L), generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, L, 96)
    before = shard_sequence(x).shape[1]  # no mesh model yet: the default group is right
    mesh = build_mesh("device_mesh", 2, 2)
    par = odysseus.parallelize(make_block(**ODD), "odysseus", mesh, backend="naive")
    errors = []
    for who, call in (
        ("shard_sequence", lambda: shard_sequence(x)),
        ("gather_sequence", lambda: gather_sequence(x[:, :3])),
        ("causal_lm_loss", lambda: causal_lm_loss(torch.randn(1, 15, 50), ids)),
        ("lm_head_loss", lambda: lm_head_loss(torch.randn(1, 15, 96), torch.nn.Linear(96, 50), ids)),
    ):
        with pytest.raises(ValueError, match=f"{who} was called without a group.*2-D mesh \\(dp=2, sp=2\\)") as e:
            call()
        errors.append(str(e.value))
    # With the mesh, the same calls run: the shard is 1/sp of the sequence.
    local = shard_sequence(x, mesh)
    out = par(local)
    loss = causal_lm_loss(torch.randn(1, local.shape[1], 50), ids, mesh)
    return before, local.shape[1], out.shape[1], bool(torch.isfinite(loss)), errors


def test_sequence_functions_without_the_mesh_of_a_mesh_model_raise_on_every_rank():
    for rank, (before, local, out, finite, errors) in enumerate(run_ranks(4, _default_group_on_a_mesh_model)):
        assert before == (16 if rank == 0 else 15), before  # 61 tokens over the 4 ranks of the default group
        assert local == (31 if rank % 2 == 0 else 30) and out == local and finite, (rank, local, out)
        assert len(errors) == 4 and all("over all 4 ranks" in e for e in errors), errors


# --- auto: symm within a host, pipelined across hosts -------------------------------------------------------


def _hosts(rank, world):
    import os

    from torch.distributed.device_mesh import init_device_mesh

    from odysseus import overlap
    from odysseus.overlap import symm

    os.environ["ODYSSEUS_HOST"] = "node-a" if rank < 2 else "node-b"  # two "nodes" of two ranks
    overlap.AUTO_SYMM_DEVICE_TYPES = ("cuda", "cpu")  # let auto consider symm on CPU (its stand-in)
    calls = []
    real = symm.transport_for
    symm.transport_for = lambda device: calls.append(device) or real(device)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    cpu = torch.device("cpu")
    chosen = {}
    for dim in ("sp", "dp"):  # sp: {0, 1} and {2, 3}, one host each; dp: {0, 2} and {1, 3}, two hosts
        before = len(calls)
        chosen[dim] = [overlap.resolve_backend("auto", mesh.get_group(dim), cpu) for _ in range(2)]
        chosen[dim + " probes"] = len(calls) - before
    # A TP-SP block over the group that spans hosts runs (pipelined) and matches the dense block.
    ref = make_block(**ODD)
    par = odysseus.parallelize(ref, "tp-sp", mesh.get_group("dp"), backend="auto")
    x = torch.randn(1, L, 96, generator=torch.Generator().manual_seed(0))
    y = gather_sequence(par(shard_sequence(x, par.pg)).detach(), par.pg)
    assert_close(y, ref(x).detach(), **TOL, what="tp-sp across hosts")
    return chosen


def test_auto_takes_symm_within_a_host_and_pipelined_across_hosts():
    for rank, chosen in enumerate(run_ranks(4, _hosts, timeout=180)):
        assert chosen["sp"] == ["symm", "symm"] and chosen["sp probes"] >= 1, (rank, chosen)
        # Across hosts: decided from the host names alone, once; symmetric memory is never tried.
        assert chosen["dp"] == ["pipelined", "pipelined"] and chosen["dp probes"] == 0, (rank, chosen)


# --- a rank failing in one replica ---------------------------------------------------------------------------


def _one_rank_fails(rank, world, linger):
    mesh_arg = build_mesh("pair", 2, 2, timeout_s=3)
    par = odysseus.parallelize(make_block(**ODD), "odysseus", mesh_arg, backend="pipelined")
    x = shard_sequence(torch.randn(1, L, 96, generator=torch.Generator().manual_seed(rank // 2)), mesh_arg)
    t0 = time.monotonic()
    try:
        with odysseus.fail_fast():
            if rank == 3:  # replica 1's second rank
                raise RuntimeError("simulated failure on rank 3 mid-step")
            par(x).sum().backward()
            finalize_grads(par)  # replica 0 gets here and waits for replica 1 over dp
    except odysseus.PeerFailure as err:
        return "peer", err.rank, str(err), time.monotonic() - t0
    except RuntimeError as err:
        if linger:  # stay alive: the peers must give up by the groups' timeout, not a closed socket
            time.sleep(linger)
        return "self", rank, str(err), time.monotonic() - t0
    return "finished", rank, "", time.monotonic() - t0


@pytest.mark.parametrize("linger", [0, 6], ids=["exits", "stays-alive"])
def test_a_failing_rank_in_one_replica_fails_every_rank_and_is_named(linger):
    results = run_ranks(4, _one_rank_fails, linger, timeout=60, pg_timeout=3)
    assert results[3][:2] == ("self", 3)
    for kind, failed, msg, elapsed in results[:3]:
        assert kind == "peer" and failed == 3, (kind, failed, msg)
        assert "rank 3 failed first (RuntimeError: simulated failure on rank 3 mid-step)" in msg
        assert elapsed < 3 + 8, elapsed


# --- examples/train_llama.py --dp --sp ----------------------------------------------------------------------


def _train(rank, world, flags):
    from test_train_example import _example

    example = _example()
    return example.train(example.parse_args(flags))


def test_train_example_two_replicas_match_one_replica_on_their_rows():
    """--dp 2 --batch 1 (each replica its row, ZeRO-3 hybrid) trains exactly as --dp 1 --batch 2 (both rows on
    one replica, ZeRO-3 over sp): the same loss at every step, so the replicas' gradients were summed (a
    replica training alone would drift from the second step on)."""
    from test_train_example import SIZES

    flags = [*SIZES, "--steps", "4", "--save-every", "0", "--strategy", "odysseus", "--zero3", "--seq", "61"]
    two = run_ranks(4, _train, [*flags, "--dp", "2", "--sp", "2", "--batch", "1"], timeout=300)
    one = run_ranks(2, _train, [*flags, "--dp", "1", "--sp", "2", "--batch", "2"], timeout=300)
    assert all(losses == two[0] for losses in two) and all(losses == one[0] for losses in one)
    assert_close(torch.tensor(two[0]), torch.tensor(one[0]), 1e-5, 0, what="losses of --dp 2 vs --dp 1")
    assert two[0][-1] < two[0][0], two[0]
