"""The symm transport's guarantees on the emulated runtime: stream order, barriers, buffer reuse, race detection.

Ranks run symm calls back to back with no other collective between them (a gloo collective would line the
ranks up again and hide a missing barrier), with one rank's copy engine or reduction late. Every reference is
computed locally before the calls, in fp64, from inputs every rank draws from the same seeds. Every test here
has "symm" in its name: ``pytest -k symm``.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from helpers import assert_close
from multirank import run_ranks

import odykernels
import odysseus
from odykernels import race
from odykernels.barrier import LAST_EPOCH
from odysseus.comm import resolve_group, shard_sizes
from odysseus.layout import offsets
from odysseus.overlap import Ring, stream, symm
from odysseus.overlap.transport import FLAG_DTYPE, device, transport_for

CPU = torch.device("cpu")
B, L, K, N = 2, 11, 16, 24
CALLS = 4
TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)


def _inputs(call: int, world: int):
    """Call ``call``'s whole problem, the same on every rank: gathered x (B, L, K), w (K, N), and for the
    reduce-scatter every rank's partial input (world, B, L, K) and weight (world, K, N)."""
    g = torch.Generator().manual_seed(100 + call)
    return (
        torch.randn(B, L, K, generator=g),
        torch.randn(K, N, generator=g),
        torch.randn(world, B, L, K, generator=g),
        torch.randn(world, K, N, generator=g),
    )


def _store():
    return torch.distributed.distributed_c10d._get_default_store()


def _hold_until(key: str) -> None:
    """Block (the stream this runs on) until rank 0 has started the call named ``key``, then 300 ms more.

    Skew by events, not by time alone: however loaded the machine, rank 0 has queued its next call, which
    (were the barrier missing) would overwrite what this rank is about to read."""
    _store().wait([key])
    time.sleep(0.3)


def _late_rank(rank: int, late: str, op: str, call: int) -> None:
    """Before call ``call`` of ``op``: rank 0 announces it; rank 1's copy engine ("copy") or reduction
    ("reduction") holds its work of the op's first call until rank 0 has started the second."""
    if rank == 0 and call == 1:
        _store().set(f"{op}-1", "started")
    if rank != 1:
        return
    engine = transport_for(CPU)
    if late == "copy":
        engine.delay_s = 1.0 if call == 0 else 0.0  # delay_s > 0 queues an rt.sleep before each pull
        engine.rt.sleep = lambda seconds: engine.rt.current_stream().put(lambda: _hold_until(f"{op}-1"))
    elif late == "reduction" and op == "rs" and call == 0:
        real = odykernels.prepare_reduce_slots

        def prepare(*args, **kwargs):
            launch = real(*args, **kwargs)
            run = launch.run
            launch.run = lambda: _hold_until("rs-1") or run()  # runs on the stream: a late reduction
            odykernels.prepare_reduce_slots = real  # the first call's reduction only
            return launch

        odykernels.prepare_reduce_slots = prepare


def _back_to_back(rank, world, late, ops, wrap):
    """``CALLS`` calls of each op in ``ops`` ("ag": ag_matmul and the streamed gather, "rs": matmul_rs), one op
    at a time: no collective, and no other op's barrier, between two calls of an op. Returns the epochs."""
    symm.TIMEOUT_S = 5.0  # a missing barrier may end in a timeout: keep it short
    if wrap:  # the epochs of workspaces and barriers wrap during the calls
        symm.EPOCH_START = 2**31 - 3
        device.BARRIER_START = LAST_EPOCH - 2

    pg = resolve_group()
    sizes = shard_sizes(L, world)
    o = offsets(sizes)
    problems = [_inputs(call, world) for call in range(CALLS)]
    mine = [x[:, o[rank] : o[rank + 1]].contiguous() for x, *_ in problems]
    got, want = [], []
    if "ag" in ops:
        want += [("ag_matmul", x.double() @ w.double()) for x, w, _, _ in problems]
        for call, (_, w, *_) in enumerate(problems):
            _late_rank(rank, late, "ag", call)
            got.append(symm.ag_matmul(mine[call], w, sizes, pg)[0])
        want += [("streamed gather", x.double() @ w.double()) for x, w, _, _ in problems]
        for call, (_, w, *_) in enumerate(problems):
            _late_rank(rank, late, "stream", call)
            got.append(stream.ag_matmul(symm.gather_stream(mine[call], sizes, pg, Ring(2, 2)), w, L, B))
    if "rs" in ops:
        full = [torch.einsum("rblk,rkn->bln", xs.double(), ws.double()) for *_, xs, ws in problems]
        want += [("matmul_rs", f[:, o[rank] : o[rank + 1]]) for f in full]
        for call, (*_, xs, ws) in enumerate(problems):
            _late_rank(rank, late, "rs", call)
            got.append(symm.matmul_rs(xs[rank], ws[rank], sizes, pg))
    odysseus.check_overlap()
    for i, (a, (what, b)) in enumerate(zip(got, want)):
        assert_close(a, b, **TOL, what=f"{what} call {i % CALLS}")
    return [ws.epoch for ws in symm._WORKSPACES.values()]


@pytest.mark.parametrize("late, ops", [("copy", "ag"), ("reduction", "rs")])
def test_symm_back_to_back_calls_with_a_late_rank(late, ops):
    # The stage barrier (all-gather), the slot barrier (reduce-scatter) and the ring slots are all that keep a
    # fast rank from overwriting what the late one still reads.
    for epochs in run_ranks(3, _back_to_back, late, ops, False, timeout=180):
        assert epochs[-1] == CALLS, epochs


def test_symm_epochs_wrap_during_back_to_back_calls():
    for epochs in run_ranks(2, _back_to_back, "copy", ("ag", "rs"), True, timeout=180):
        # 2**31 - 3 -> 2**31 - 2 -> 2**31 - 1 -> 1 -> ...: every workspace crossed the wrap.
        assert epochs == [CALLS - 2, CALLS - 2], epochs


# ------------------------------------------------------------------------------------ race detector


def test_symm_race_detector_names_kernel_program_chunk_and_epoch():
    a = torch.randn(6, 8)
    b = torch.randn(8, 4)
    flags = torch.tensor([0, 1], dtype=FLAG_DTYPE)  # chunk 1 has landed for epoch 1
    status = odykernels.signal.new_status(CPU)

    def run(guard_value, pending):
        launch = odykernels.prepare_ag_matmul(a, b, [3, 3], 0, flags, 1, status=status, max_programs=1)
        guard = race.Guard(*race.region(a[3:]), flags[1:].data_ptr(), guard_value, 1)
        token = race.transfer_issued(a[3:]) if pending else None
        try:
            with race.watch("ag_matmul", [guard]):
                launch.run()
        finally:
            if token is not None:
                race.transfer_done(token)

    run(1, False)  # acquired, delivered: no complaint
    with pytest.raises(Exception, match=r"race: ag_matmul: program 0 loaded chunk 1 \(epoch 1\) while its transfer"):
        run(1, True)
    with pytest.raises(Exception, match=r"program 0 loaded chunk 1 \(epoch 2\) before acquiring its flag"):
        run(2, False)  # the kernel acquired epoch 1, but the data belongs to epoch 2


def _late_flags(rank, world, planted):
    """Pulls held 200 ms on the copy engine; ``planted``: the flag is written before the copy, not after."""
    symm.TIMEOUT_S = 5.0
    engine = transport_for(CPU)
    engine.delay_s = 0.2
    if planted:

        def pull(dst, src, flags=None, index=0, value=0):
            engine.rt.wait_stream(engine.copy_stream, engine.rt.current_stream())
            with engine.rt.use_stream(engine.copy_stream):
                engine.write_flag(flags, index, value)
                engine.rt.sleep(engine.delay_s)
                engine.rt.copy(dst, src)

        engine.pull = pull
    pg = resolve_group()
    sizes = shard_sizes(L, world)
    x, w = _inputs(0, world)[:2]
    o = offsets(sizes)
    try:
        got = symm.ag_matmul(x[:, o[rank] : o[rank + 1]].contiguous(), w, sizes, pg)[0]
    except Exception as err:  # noqa: BLE001 - the detector's report is the result
        return str(err)
    assert_close(got, x.double() @ w.double(), **TOL, what="ag_matmul with late pulls")
    return None


@pytest.mark.parametrize("planted", [False, True])
def test_symm_race_detector_catches_a_flag_written_before_its_copy(planted):
    for rank, error in enumerate(run_ranks(2, _late_flags, planted)):
        if not planted:
            assert error is None, (rank, error)
        else:
            assert error is not None and "race: " in error, (rank, error)
            # Caught when the flag is written, or at the latest when the kernel loads the chunk.
            assert "was written while a transfer" in error or "while its transfer was still running" in error, error


# ------------------------------------------------------------------------------------ peer access


def _peer_refused(rank, world):
    from odysseus import overlap

    overlap.AUTO_SYMM_DEVICE_TYPES = ("cuda", "cpu")
    transport_for(CPU).rt.refused_peers = {(0, 1)}  # emulated devices are the global ranks
    pg = resolve_group()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = [overlap.resolve_backend("auto", pg, CPU) for _ in range(2)]
    return chosen, [str(w.message) for w in caught]


def test_symm_auto_falls_back_without_peer_access():
    for chosen, warned in run_ranks(3, _peer_refused):
        assert chosen == ["pipelined"] * 2
        assert len(warned) == 1 and "device 0 and device 1 of the group have no peer access" in warned[0], warned
