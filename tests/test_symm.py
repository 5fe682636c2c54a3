"""The symm backend end to end on CPU gloo ranks: the real symm.py, transport and odykernels, runtime emulated.

Each rank's buffers live in shared memory that every forked rank maps; the Triton interpreter runs the
kernels, which wait on flags written by another thread (the copy engine) or another process (a peer's
producer). Shapes are small, since every ``tl.dot`` costs milliseconds in the interpreter, but odd: 6 heads
and 2 kv heads over up to 4 ranks (uneven heads, kv heads shared by ranks), 13 tokens (uneven shards),
batch 2. Every test here has "symm" in its name: ``pytest -k symm``.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from helpers import assert_close, assert_runs_close, make_block, run_parallel, run_reference
from multirank import run_ranks

import odykernels
import odysseus
from odysseus import CommLedger, gather_sequence, shard_sequence
from odysseus.comm import resolve_group, shard_sizes
from odysseus.overlap import Ring, ag_matmul, matmul_rs, symm
from odysseus.overlap.transport import FLAG_DTYPE, contract, transport_for

SMALL = dict(hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=40)
B, L = 2, 13
TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)
CPU = torch.device("cpu")


def _block_parity(rank, world, strategy, save_input="gathered"):
    runtime = transport_for(CPU).rt
    runtime.copy_jitter_s = 0.002  # every copy of the streams lands up to 2 ms late, in a seeded order
    runtime.rng.seed(1000 * world + rank)
    ref = make_block(torch.float32, **SMALL)
    par = odysseus.parallelize(ref, strategy, backend="symm", save_input=save_input, ring=Ring(tokens=2, slots=2))
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(B, L, 48, generator=g), torch.randn(B, L, 48, generator=g)
    assert_runs_close(run_parallel(par, x, gy), run_reference(ref, x, gy), f"{strategy} symm")
    return True


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("strategy", ["tp-sp", "odysseus"])
def test_symm_block_parity_numerics(strategy, world):
    assert all(run_ranks(world, _block_parity, strategy))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", ["tp-sp", "odysseus"])
def test_symm_shard_mode_parity_numerics(strategy, world):
    # Pieces of 2 tokens through 2 slots: every slot is pulled into again while the GEMMs consume the other.
    assert all(run_ranks(world, _block_parity, strategy, "shard"))


def _reuse_and_growth(rank, world):
    """Calls with shrinking and growing lengths, two modules on one group's workspaces."""
    ref = make_block(torch.float32, **SMALL)
    attn = odysseus.parallelize(ref.self_attn, "odysseus", backend="symm")
    mlp = odysseus.parallelize(ref.mlp, "tp-sp", backend="symm")
    sizes_seen = []
    for length in (13, 5, 40, 13):
        x = torch.randn(B, length, 48, generator=torch.Generator().manual_seed(length))
        xp = x.clone().requires_grad_()
        got = gather_sequence(mlp(attn(shard_sequence(xp))))
        got.backward(torch.ones_like(got) / world)  # each rank's loss sees the whole output once
        xr = x.clone().requires_grad_()
        want = ref.mlp(ref.self_attn(xr))
        want.backward(torch.ones_like(want))
        assert_close(got, want, **TOL, what=f"L={length} output")
        assert_close(xp.grad, xr.grad, **TOL, what=f"L={length} x.grad")
        sizes_seen.append(symm._WORKSPACES[(attn.pg.group_name, "ag", torch.float32, CPU)].data.numel)
    odysseus.check_overlap()
    # One workspace per role serves both modules; it grew for L=40 and was reused for the rest.
    assert len(symm._WORKSPACES) == 2, sorted(symm._WORKSPACES)
    assert sizes_seen[0] == sizes_seen[1] < sizes_seen[2] == sizes_seen[3]
    return True


def test_symm_buffers_reused_grown_and_shared():
    assert all(run_ranks(3, _reuse_and_growth))


def _interleaved_layers(rank, world):
    """Two stacked blocks: forward through both, then backward through both, on one set of workspaces."""
    refs = [make_block(torch.float32, seed=s, **SMALL) for s in (0, 1)]
    pars = [odysseus.parallelize(r, "odysseus", backend="symm") for r in refs]
    g = torch.Generator().manual_seed(3)
    x, gy = torch.randn(B, L, 48, generator=g), torch.randn(B, L, 48, generator=g)
    xr = x.clone().requires_grad_()
    refs[1](refs[0](xr)).backward(gy)
    xp = x.clone().requires_grad_()
    y = pars[1](pars[0](shard_sequence(xp)))
    (y * shard_sequence(gy)).sum().backward()
    for p in pars:
        odysseus.finalize_grads(p)
    assert_close(gather_sequence(y.detach()), refs[1](refs[0](x)), **TOL, what="output")
    assert_close(xp.grad, xr.grad, **TOL, what="x.grad")
    for ref, par in zip(refs, pars):
        grads = odysseus.dense_state_dict(par, grad=True)
        for k, p in ref.named_parameters():
            assert_close(grads[k], p.grad, **TOL, what=f"{k}.grad")
    return True


def test_symm_layers_interleaved_forward_backward_numerics():
    assert all(run_ranks(2, _interleaved_layers))


# ------------------------------------------------------------------------------------ late data


def _spy_on_launch(name: str, flag_arg: int, notes: list, delay_s: float = 0.0):
    """Wrap ``odykernels.<name>`` so each launch notes its flags as they are when it starts (after a delay)."""
    original = getattr(odykernels, name)

    def prepare(*args, **kwargs):
        launch = original(*args, **kwargs)
        flags, run = args[flag_arg], launch.run

        def noted_run():
            time.sleep(delay_s)
            notes.append(flags.tolist())
            return run()

        launch.run = noted_run
        return launch

    setattr(odykernels, name, prepare)


def _late_pulls(rank, world):
    """Every pull lands 50 ms late: the consumer starts first and waits for each chunk's flag."""
    transport_for(CPU).delay_s = 0.05
    notes = []
    _spy_on_launch("prepare_ag_matmul", 4, notes)
    pg = resolve_group()
    sizes = shard_sizes(L, world)
    g = torch.Generator().manual_seed(rank)
    for call in (1, 2):
        x, w = torch.randn(B, sizes[rank], 32, generator=g), torch.randn(32, 24, generator=g)
        got = ag_matmul(x, w, sizes, pg, "symm")
        want = ag_matmul(x, w, sizes, pg, "naive")
        assert_close(got, want, 1e-6, 1e-6, f"ag_matmul call {call} with late pulls", scaled=True)
        # When the kernel started, no peer chunk of this call had landed yet.
        assert all(notes[-1][j] == call - 1 for j in range(world) if j != rank), notes[-1]
    odysseus.check_overlap()
    return True


def test_symm_ag_matmul_waits_for_late_pulls():
    assert all(run_ranks(3, _late_pulls))


def _late_producer(rank, world):
    """Rank 1's producer starts 1 s late: the others' reductions start first and wait for its flag."""
    notes = []
    if rank == 1:
        _spy_on_launch("prepare_matmul_rs", 6, [], delay_s=1.0)
    _spy_on_launch("prepare_reduce_slots", 1, notes)
    pg = resolve_group()
    sizes = shard_sizes(L, world)
    g = torch.Generator().manual_seed(rank)
    x, w = torch.randn(B, L, 24, generator=g), torch.randn(24, 40, generator=g)
    got = matmul_rs(x, w, sizes, pg, "symm")
    want = matmul_rs(x, w, sizes, pg, "naive")
    assert_close(got, want, 1e-6, 1e-6, "matmul_rs with a late producer", scaled=True)
    odysseus.check_overlap()
    return notes[0]


def test_symm_matmul_rs_waits_for_a_late_producer():
    notes = run_ranks(3, _late_producer)
    for rank in (0, 2):
        assert notes[rank][1] == 0, f"rank {rank} started reducing after rank 1 had produced: {notes[rank]}"


# ------------------------------------------------------------------------------------ dead peers


def _dead_peer(rank, world, where):
    symm.TIMEOUT_S = 1.0
    pg = resolve_group()
    sizes = shard_sizes(L, world)
    x, w = torch.randn(B, sizes[rank], 16), torch.randn(16, 16)
    xr = torch.randn(B, L, 16)
    ag_matmul(x, w, sizes, pg, "symm")  # a first call that works: workspaces exist on every rank
    matmul_rs(xr, w, sizes, pg, "symm")
    odysseus.check_overlap()
    start = time.monotonic()
    try:
        if where == "barrier":  # rank 1 is gone: it never reaches the next call
            if rank == 1:
                return None
            ag_matmul(x, w, sizes, pg, "symm")
            odysseus.check_overlap()
        elif where == "producer":  # rank 1 reaches the call but its producer never runs
            if rank == 1:
                odykernels.prepare_matmul_rs = lambda *a, **k: odykernels._runtime.Launch(None, CPU)
            matmul_rs(xr, w, sizes, pg, "symm")
            odysseus.check_overlap()
        elif where == "pull":  # rank 0's copy engine never delivers chunk 1
            if rank == 0:
                engine = transport_for(CPU)
                real_pull = engine.pull
                engine.pull = lambda dst, src, flags, j, v: None if j == 1 else real_pull(dst, src, flags, j, v)
            ag_matmul(x, w, sizes, pg, "symm")
            odysseus.check_overlap()
    except TimeoutError as err:
        return str(err), time.monotonic() - start
    return None


@pytest.mark.parametrize(
    "where, ranks, message",
    [
        ("barrier", [0], r"barrier \(symm, group .*\): rank 0 timed out on channel 0 waiting for rank 1 to arrive"),
        ("producer", [0, 1], r"reduce_slots \(symm, group .*\): rank {r} timed out waiting for source 1: its flag "),
        ("pull", [0], r"ag_matmul \(symm, group .*\): rank 0 timed out waiting for chunk 1: its flag read 1, exp"),
    ],
)
def test_symm_dead_peer_raises_timeout_naming_rank_and_chunk(where, ranks, message):
    import re

    results = run_ranks(2, _dead_peer, where, timeout=120)
    for rank in ranks:
        assert results[rank] is not None, f"rank {rank} did not time out"
        text, elapsed = results[rank]
        assert re.search(message.format(r=rank), text), text
        assert elapsed < 30, f"rank {rank} took {elapsed:.1f} s to report a 1 s timeout"


# ------------------------------------------------------------------------------------ hot path


def _status_reads(rank, world):
    import odykernels.signal as signal

    reads = []
    real = signal.read_status
    signal.read_status = lambda status: reads.append(1) or real(status)
    ref = make_block(torch.float32, **SMALL)
    par = odysseus.parallelize(ref, "tp-sp", backend="symm")
    x = shard_sequence(torch.randn(B, L, 48))
    for _ in range(2):
        par(x).sum().backward()
    hot = len(reads)
    odysseus.finalize_grads(par)
    return hot, len(reads) - hot


def test_symm_hot_path_makes_no_host_read():
    for hot, at_step_end in run_ranks(2, _status_reads):
        assert hot == 0, f"{hot} status reads during forward/backward"
        assert at_step_end == 2, f"finalize_grads read {at_step_end} status records, expected 2 (ag and rs)"


def _copies(rank, world):
    """Bytes copied by one ag_matmul: the own chunk twice (stage, gathered tensor), each peer chunk once.

    Copies run on the runtime's streams (counted at the runtime); the host itself copies nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # The interpreter copies each argument's storage onto itself after a launch; torch skips a copy of
            # a tensor onto itself (copy_impl's is_same_data), so those move nothing.
            onto_itself = func is torch.ops.aten.copy_.default and args[0].data_ptr() == args[1].data_ptr()
            if func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
                CountCopies.bytes += 0 if onto_itself else out.nbytes
            return out

    pg = resolve_group()
    sizes = shard_sizes(L, world)
    K = 16
    x, w = torch.randn(B, sizes[rank], K), torch.randn(K, 24)
    symm.ag_matmul(x, w, sizes, pg)  # workspaces and compile caches warm
    engine = transport_for(CPU)
    queued = []
    real_copy = engine.rt.copy
    engine.rt.copy = lambda dst, src: queued.append(dst.nbytes) or real_copy(dst, src)
    before = engine.bytes_pulled
    with CountCopies():  # the backend itself: the custom op around it would hide its inner ops from the mode
        symm.ag_matmul(x, w, sizes, pg)
    pulled = engine.bytes_pulled - before
    return CountCopies.bytes, sum(queued) - pulled, pulled


def test_symm_ag_matmul_copies_only_what_it_must():
    world = 3
    sizes, row = shard_sizes(L, world), B * 16 * 4
    for rank, (on_host, local, pulled) in enumerate(run_ranks(world, _copies)):
        assert on_host == 0, (rank, on_host)
        assert local == 2 * sizes[rank] * row, (rank, local)
        assert pulled == (L - sizes[rank]) * row, (rank, pulled)


def _ledger(rank, world):
    pg = resolve_group()
    sizes = shard_sizes(L, world)
    x, w, xr = torch.randn(B, sizes[rank], 16), torch.randn(16, 24), torch.randn(B, L, 16)
    out = {}
    for backend in ("naive", "symm"):
        with CommLedger() as led:
            ag_matmul(x, w, sizes, pg, backend)
            matmul_rs(xr, w[:, :16], sizes, pg, backend)
        out[backend] = led.records
    return out


def test_symm_ledger_equals_the_logical_collectives():
    world = 3
    sizes = shard_sizes(L, world)
    for rank, out in enumerate(run_ranks(world, _ledger)):
        assert out["symm"] == out["naive"]
        ag, rs = out["symm"]
        row = B * 16 * 4
        assert (ag.op, ag.bytes_sent, ag.bytes_received) == (
            "all_gather",
            2 * sizes[rank] * row,
            (L - sizes[rank]) * row,
        )
        assert (rs.op, rs.bytes_sent, rs.bytes_received) == (
            "reduce_scatter",
            (L - sizes[rank]) * row,
            2 * sizes[rank] * row,
        )


# ------------------------------------------------------------------------------------ auto


def _auto(rank, world, fault):
    from odysseus import overlap

    overlap.AUTO_SYMM_DEVICE_TYPES = ("cuda", "cpu")
    if fault == "wrong" and rank == 1:
        real = symm.matmul_rs
        symm.matmul_rs = lambda x, w, sizes, pg: real(x, w, sizes, pg) * 1.5
    if fault == "raises" and rank == 0:

        def broken(*args, **kwargs):
            raise RuntimeError("no symmetric memory here")

        symm.transport_for = broken
    pg = resolve_group()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = [overlap.resolve_backend("auto", pg, CPU) for _ in range(3)]
    explicit = None
    if fault == "raises" and rank == 0:  # alone: its peers would wait for it in the allocation
        try:
            ag_matmul(
                torch.randn(1, shard_sizes(L, world)[rank], 16), torch.randn(16, 8), shard_sizes(L, world), pg, "symm"
            )
        except RuntimeError as err:
            explicit = str(err)
    return chosen, [str(w.message) for w in caught], explicit


@pytest.mark.parametrize(
    "fault, backend, reason",
    [
        (None, "symm", None),
        ("wrong", "pipelined", "rank 1: matmul_rs differs from naive"),
        ("raises", "pipelined", "rank 0: RuntimeError: no symmetric memory here"),
    ],
)
def test_symm_auto_falls_back_once_when_symm_fails(fault, backend, reason):
    for rank, (chosen, warned, explicit) in enumerate(run_ranks(2, _auto, fault)):
        assert chosen == [backend] * 3
        if reason is None:
            assert warned == []
        else:
            assert len(warned) == 1 and reason in warned[0] and "uses 'pipelined'" in warned[0], warned
        if fault == "raises" and rank == 0:
            assert explicit is not None and "no symmetric memory here" in explicit  # explicit symm still raises


# ------------------------------------------------------------------------------------ transport contract


def test_symm_transport_enforces_cuda_preconditions():
    engine = transport_for(CPU)
    good = torch.zeros(4, dtype=FLAG_DTYPE)
    engine.write_flag(good, 3, 2**32 - 1)
    engine.hand_off(10.0)  # the write is queued on the current stream
    assert good.tolist() == [0, 0, 0, 2**32 - 1]
    for flags, index, value, message in [
        (torch.zeros(4, dtype=torch.int32), 0, 1, "input must be a flat, contiguous uint32 tensor"),
        (torch.zeros(2, 2, dtype=FLAG_DTYPE), 0, 1, "input must be a flat, contiguous uint32 tensor"),
        (torch.zeros(8, dtype=FLAG_DTYPE)[::2], 0, 1, "input must be a flat, contiguous uint32 tensor"),
        (good, -1, 1, r"offset must be greater than or equal to 0 \(got -1\)"),
        (good, 0, 2**32, r"val must be in the range of \[0, 4294967295\]"),
        (good, 4, 1, r"offset \(4\) exceeded the numel of the input \(4\)"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            engine.write_flag(flags, index, value)
        with pytest.raises(RuntimeError, match=message):
            engine.pull(torch.zeros(3), torch.zeros(3), flags, index, value)
    with pytest.raises(RuntimeError, match=r"offset \+ count \(5\) exceeded"):
        contract.check_write_value32(good, 2, 1, count=3)
    with pytest.raises(RuntimeError, match="must both be contiguous"):
        engine.pull(torch.zeros(3, 4).t(), torch.zeros(4, 3), good, 0, 1)
    with pytest.raises(RuntimeError, match="same dtype and shape"):
        engine.pull(torch.zeros(3), torch.zeros(3, dtype=torch.float16), good, 0, 1)
    with pytest.raises(RuntimeError, match=r"requested size \(36 bytes\) exceeds the allocated size \(32 bytes\)"):
        contract.check_get_buffer(1, 2, (3, 3), torch.float32, 0, 32)
    with pytest.raises(RuntimeError, match="Invalid peer rank: 2"):
        contract.check_get_buffer(2, 2, (1,), torch.float32, 0, 32)
    with pytest.raises(RuntimeError, match="storage_offset must be non-negative"):
        contract.check_get_buffer(0, 2, (1,), torch.float32, -1, 32)
    with pytest.raises(RuntimeError, match="buffer_size == reqs"):
        contract.check_rendezvous_sizes([64, 64, 32])


def _buffer_contract(rank, world):
    pg = resolve_group()
    engine = transport_for(CPU)
    buf = engine.allocate(pg, 10, torch.float32, 5.0)
    buf.local.copy_(torch.arange(10.0) + 100 * rank)
    buf.barrier(0, 5.0)
    engine.hand_off(10.0)  # the barrier runs on the stream: the host reads peers after it
    peer = (rank + 1) % world
    seen = buf.peer(peer, (2, 3), torch.float32, offset=4)
    errors = []
    bad_views = [((peer, (11,), torch.float32), {}), ((peer, (2, 4), torch.float32), dict(offset=3))]
    for args, kwargs in bad_views + [((world, (1,), torch.float32), {})]:
        try:
            buf.peer(*args, **kwargs)
        except RuntimeError as err:
            errors.append(str(err))
    try:  # 2 * world words a channel in the 9216-byte pad
        buf.barrier(9216 // (8 * world), 5.0)
    except ValueError as err:
        errors.append(str(err))
    buf.barrier(1, 5.0)
    engine.hand_off(10.0)
    try:  # symmetric memory needs the same size on every rank
        engine.allocate(pg, 10 + rank, torch.float32, 5.0)
    except RuntimeError as err:
        errors.append(str(err))
    return seen.tolist(), buf.peer_offsets()[rank].item(), errors


def test_symm_cpu_buffers_are_shared_and_bounds_checked():
    for rank, (seen, own_offset, errors) in enumerate(run_ranks(3, _buffer_contract)):
        peer = (rank + 1) % 3
        assert seen == [[100 * peer + 4 + i + 3 * r for i in range(3)] for r in range(2)]
        assert own_offset == 0
        assert len(errors) == 5, errors
        assert "exceeds the allocated size" in errors[0] and "exceeds the allocated size" in errors[1]
        assert "Invalid peer rank: 3" in errors[2] and "channel=384 must be in [0, 384)" in errors[3]
        assert "the ranks allocated [40, 44, 48] bytes" in errors[4]
