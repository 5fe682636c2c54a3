"""Every wait of the fused kernels, tested with data that arrives after the consumer has started.

Chunk rows, receive slots and outputs start as NaN and flags hold the previous epoch; a producer (a thread on
the CPU, a copy stream on the GPU) fills one chunk or slot at a time and only then sets its flag, while the
kernel is already running. A tile that reads before its flag says the data is there reads NaN, and the
comparison with the fp64 reference fails. (A test whose data is all in place before launch passes whatever
the kernel's waits do.)
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from odykernels import _interpret, ag_matmul, reduce_slots, split_rows
from odykernels._chunks import chunk_starts
from odykernels.signal import FLAG_DTYPE
from odykernels.testing import program_order

EPOCH = 5
M, K, N = 61, 24, 40  # chunks of 2-4 M-tiles and 3 N-tiles of 16 under the interpreter


def _randn(*shape, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _assert_close(actual, expected, tol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    bad = ~((actual - expected).abs() <= tol * (1 + expected.abs()))  # NaN is bad
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} wrong, {int(actual.isnan().sum())} NaN"


def _deliver(pieces, flags, atomics_before: int, first_s: float = 0.3, between_s: float = 0.1):
    """Producer thread: ``first_s`` after the kernel's first flag operation (an atomic: it has reached a chunk
    or slot it must wait for), write each (dst, src, index), then its flag, ``between_s`` apart.

    Counting from the first flag operation, not from the launch, keeps the test independent of the machine's
    load: every load the kernel issued before that wait is issued before any data lands. (On CPU only:
    ``atomics_before`` is :func:`odykernels._interpret.atomic_count` before the launch; 30 s at most.)
    """
    deadline = time.monotonic() + 30
    while _interpret.atomic_count() == atomics_before and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(first_s - between_s)
    for dst, src, index in pieces:
        time.sleep(between_s)
        dst.copy_(src)
        flags[index].fill_(EPOCH)


@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("n", [N, 24])  # 3 or 2 N-tiles: which tile of a chunk each program meets first
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ag_matmul_waits_for_chunks_that_land_late_numerics(world, n, programs):
    _ag_matmul_late(world, n, programs, "pointer")


@pytest.mark.parametrize("path, programs, seed", [("pointer", 3, 1), ("pointer", 3, 2), ("tma", 3, 1), ("tma", 1, 1)])
def test_ag_matmul_late_chunks_any_program_order_and_tma_prefetch_numerics(path, programs, seed):
    """Programs in several seeded orders (the protocol must not need program 0 first), and the TMA path,
    whose interpreted loads are issued num_stages - 1 iterations early like the compiled pipeline's: a flag
    acquired later than that (a LOOKAHEAD shorter than num_stages) reads rows that have not landed."""
    with program_order(seed):
        _ag_matmul_late(3, N, programs, path)


def _ag_matmul_late(world: int, n: int, programs: int, path: str) -> None:
    a, b = _randn(M, K, seed=1), _randn(K, n, seed=2)
    sizes, starts = split_rows(M, world), chunk_starts(split_rows(M, world))
    for rank in range(world):
        a_full = torch.full((M, K), float("nan"))
        own = slice(starts[rank], starts[rank + 1])
        a_full[own] = a[own]  # the local chunk is in place before launch
        flags = torch.full((world,), EPOCH - 1, dtype=FLAG_DTYPE)
        ring = [(rank + s) % world for s in range(1, world)]
        pieces = [(a_full[starts[c] : starts[c + 1]], a[starts[c] : starts[c + 1]], c) for c in ring]
        producer = threading.Thread(target=_deliver, args=(pieces, flags, _interpret.atomic_count()))
        producer.start()
        out = torch.full((M, n), float("nan"))
        ag_matmul(a_full, b, sizes, rank, flags, EPOCH, out=out, timeout_s=30, max_programs=programs, path=path)
        producer.join()
        _assert_close(out, a.double() @ b.double(), 1e-4, f"{path} world {world} rank {rank}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_reduce_slots_waits_for_slots_that_land_late_numerics(world):
    sizes = split_rows(M, world)
    for rank in range(world):
        rows = sizes[rank]
        parts = [_randn(rows, N, seed=10 * world + s) for s in range(world)]
        recv = torch.full((world, max(sizes), N), float("nan"))
        flags = torch.full((world,), EPOCH - 1, dtype=FLAG_DTYPE)
        order = [(rank + s) % world for s in range(1, world + 1)]  # own slot last, as producers finish
        pieces = [(recv[s, :rows], parts[s], s) for s in order]
        producer = threading.Thread(target=_deliver, args=(pieces, flags, _interpret.atomic_count()))
        producer.start()
        out = torch.full((rows, N), float("nan"))
        reduce_slots(recv, flags, sizes, rank, EPOCH, out=out, timeout_s=30)
        producer.join()
        _assert_close(out, sum(p.double() for p in parts), 1e-5, f"world {world} rank {rank}")


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_ag_matmul_gpu_waits_for_chunks_copied_late_numerics(world):
    """A copy stream fills each remote chunk (memcpy) and then its flag (a 4-byte memcpy), after the kernel
    has been running for 50 ms: the flags arrive during the waits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    m, k, n = 4099, 512, 768
    a, b = _randn(m, k, seed=1, device="cuda"), _randn(k, n, seed=2, device="cuda")
    sizes, starts = split_rows(m, world), chunk_starts(split_rows(m, world))
    ref = a.double() @ b.double()
    copier = torch.cuda.Stream()
    for rank in range(world):
        a_full = torch.full((m, k), float("nan"), device="cuda")
        a_full[starts[rank] : starts[rank + 1]] = a[starts[rank] : starts[rank + 1]]
        flags = torch.full((world,), EPOCH - 1, dtype=FLAG_DTYPE, device="cuda")
        epoch = torch.full((1,), EPOCH, dtype=FLAG_DTYPE, device="cuda")
        out = torch.full((m, n), float("nan"), device="cuda")
        status = torch.zeros(4, dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()
        ag_matmul(a_full, b, sizes, rank, flags, EPOCH, out=out, status=status, check=False, timeout_s=10)
        time.sleep(0.05)  # the kernel is running (and waiting) before any remote chunk is copied
        with torch.cuda.stream(copier):
            for step in range(1, world):
                c = (rank + step) % world
                a_full[starts[c] : starts[c + 1]].copy_(a[starts[c] : starts[c + 1]])
                flags[c : c + 1].copy_(epoch)
        torch.cuda.synchronize()
        assert status.tolist()[0] == 0, f"rank {rank}: a wait timed out: {status.tolist()}"
        _assert_close(out, ref, 1e-5, f"gpu world {world} rank {rank}")


@pytest.mark.gpu
def test_reduce_slots_gpu_waits_for_slots_copied_late_numerics():
    world, m, n = 3, 1000, 256
    sizes = split_rows(m, world)
    copier = torch.cuda.Stream()
    for rank in range(world):
        rows = sizes[rank]
        parts = [_randn(rows, n, seed=s, device="cuda") for s in range(world)]
        recv = torch.full((world, max(sizes), n), float("nan"), device="cuda")
        flags = torch.full((world,), EPOCH - 1, dtype=FLAG_DTYPE, device="cuda")
        epoch = torch.full((1,), EPOCH, dtype=FLAG_DTYPE, device="cuda")
        out = torch.full((rows, n), float("nan"), device="cuda")
        status = torch.zeros(4, dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()
        reduce_slots(recv, flags, sizes, rank, EPOCH, out=out, status=status, check=False, timeout_s=10)
        time.sleep(0.05)
        with torch.cuda.stream(copier):
            for s in range(world):
                recv[s, :rows].copy_(parts[s])
                flags[s : s + 1].copy_(epoch)
        torch.cuda.synchronize()
        assert status.tolist()[0] == 0, f"rank {rank}: a wait timed out: {status.tolist()}"
        _assert_close(out, sum(p.double() for p in parts), 1e-5, f"gpu rank {rank}")
