"""odykernels against fp64 references: CPU tensors through the Triton interpreter, CUDA tensors (gated) compiled.

CPU cases use fp32 and fp16 only: the interpreter computes bf16 wrongly (the launchers refuse it there).
Outputs and receive buffers start as NaN, so a tile a kernel never wrote fails the comparison.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

import odykernels
from odykernels import ag_matmul, check_status, matmul, new_status, reduce_slots, split_rows
from odykernels._chunks import CHUNK, ROW_END, ROW_START, chunk_starts, mtile_table
from odykernels.matmul import CONFIGS, INTERPRETER_CONFIG, prune_configs, select_config
from odykernels.testing import SimulatedRS, simulate_ag_matmul, simulate_matmul_rs

CPU_DTYPES = [torch.float32, torch.float16]
# (atol, rtol) against an fp64 reference of the same (rounded) inputs; fp16 covers one rounding of the output
# plus, for matmul_rs, one rounding of each partial in the 16-bit receive buffer.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-2, 4e-3), torch.bfloat16: (1e-2, 1e-2)}
# Ragged on purpose: 61 rows over 3 ranks is 21/20/20; K=40 and N=24 are not multiples of the 16-wide
# interpreter tiles; world 4 with 61 rows gives 16/15/15/15.
M, K, N = 61, 40, 24
WORLDS = [1, 2, 3, 4]

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Per-dtype allclose in fp64 that names the worst element (NaN counts as a failure)."""
    atol, rtol = TOL[dtype]
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    err = (actual - expected).abs()
    bad = ~(err <= atol + rtol * expected.abs())  # NaN compares False, so it is bad
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off (atol {atol}, rtol {rtol}); "
            f"{int(torch.isnan(actual).sum())} NaN; first at {idx}: {actual[idx].item()} vs {expected[idx].item()}"
        )


def randn(*shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(M, K, N), (16, 16, 16), (5, 7, 3), (33, 70, 50)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matmul_numerics(dtype, shape):
    m, k, n = shape
    a, b = randn(m, k, dtype=dtype, seed=1), randn(k, n, dtype=dtype, seed=2)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    got = matmul(a, b, out=out)
    assert got is out
    assert_close(got, a.double() @ b.double(), dtype, f"matmul {shape} {dtype}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_matmul_strided_and_fp32_out_numerics(dtype):
    # Column-major A, a B that is a strided view, an fp32 output with padded rows.
    a = randn(K, M, dtype=dtype, seed=3).t()
    b = randn(N, 2 * K, dtype=dtype, seed=4).t()[::2]
    out = torch.full((M, N + 5), float("nan"), dtype=torch.float32)[:, :N]
    matmul(a, b, out=out)
    assert_close(out, a.double() @ b.double(), torch.float32 if dtype == torch.float32 else dtype, "strided")


def test_matmul_default_out_and_empty_k():
    a, b = randn(M, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    got = matmul(a, b)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert_close(got, a.double() @ b.double(), torch.float32, "default out")
    zero = matmul(torch.empty(3, 0), torch.empty(0, 4), out=torch.full((3, 4), float("nan")))
    assert torch.equal(zero, torch.zeros(3, 4))


@pytest.mark.parametrize(
    "a, b, message",
    [
        (torch.zeros(4), torch.zeros(4, 4), "a must be 2-D, got shape [4]"),
        (torch.zeros(4, 5), torch.zeros(4, 3), "inner dimensions differ: a is [4, 5] (K=5), b is [4, 3] (K=4)"),
        (torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.float16), "a is torch.float32 but b is torch.float16"),
        (torch.zeros(4, 4, dtype=torch.int32), torch.zeros(4, 4, dtype=torch.int32), "has dtype torch.int32"),
        (torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(4, 4, dtype=torch.bfloat16), "bfloat16 on the CPU"),
    ],
)
def test_matmul_rejects_bad_inputs(a, b, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        matmul(a, b)


def test_matmul_rejects_bad_out():
    a, b = torch.zeros(4, 5), torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"out has shape \[3, 4\], expected \[4, 3\]"):
        matmul(a, b, out=torch.zeros(3, 4))


def test_config_selection_is_deterministic_and_fits():
    h100 = select_config(8192, 4096, 4096, 2, (9, 0), 132)
    assert (h100.block_m, h100.block_n, h100.block_k) == (128, 256, 64)
    assert select_config(8192, 4096, 4096, 2, (9, 0), 132) == h100
    # A problem with fewer 128x256 tiles than SMs takes the config that makes the most tiles.
    small = select_config(256, 256, 4096, 2, (9, 0), 132)
    assert (small.block_m, small.block_n) == (64, 64)
    # fp32 tiles of 128x256x64 over 3 stages need 288 KiB: more than any card has.
    assert all(c.smem_bytes(4) <= 166912 for c in prune_configs(CONFIGS, 4096, 4096, 4096, 4, (8, 0)))
    assert select_config(5, 5, 5, 2, None, 1) == INTERPRETER_CONFIG


# ---------------------------------------------------------------------------------- chunks and tiles


def test_split_rows_rule():
    assert split_rows(61, 3) == [21, 20, 20]
    assert split_rows(61, 4) == [16, 15, 15, 15]
    assert split_rows(2, 4) == [1, 1, 0, 0]


@pytest.mark.parametrize("world, rank", [(3, 1), (4, 3), (4, 0)])
def test_mtile_table_rotates_and_never_straddles(world, rank):
    sizes = split_rows(61, world)
    starts = chunk_starts(sizes)
    table = mtile_table(sizes, rank, 16, torch.device("cpu")).tolist()
    chunks_in_order = list(dict.fromkeys(row[CHUNK] for row in table))
    assert chunks_in_order == [(rank + i) % world for i in range(world) if sizes[(rank + i) % world] > 0]
    covered = []
    for row in table:
        c = row[CHUNK]
        assert starts[c] <= row[ROW_START] < row[ROW_END] <= starts[c + 1]
        covered.extend(range(row[ROW_START], row[ROW_END]))
    assert sorted(covered) == list(range(61))


# ----------------------------------------------------------------------------------------- ag_matmul


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_ag_matmul_numerics(dtype, world):
    a_full, b = randn(M, K, dtype=dtype, seed=5), randn(K, N, dtype=dtype, seed=6)
    ref = a_full.double() @ b.double()
    for rank in range(world):
        assert_close(simulate_ag_matmul(a_full, b, world, rank), ref, dtype, f"ag world {world} rank {rank}")


def test_ag_matmul_empty_chunks_and_epoch_numerics():
    # 3 rows over 4 ranks: rank 3 owns nothing; flags hold epoch 7 as a finished seventh call leaves them.
    a_full, b = randn(3, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    for rank in range(4):
        got = simulate_ag_matmul(a_full, b, 4, rank, epoch=7)
        assert_close(got, a_full.double() @ b.double(), torch.float32, f"rank {rank}")


def test_fused_kernels_with_one_program_numerics():
    # One program walks every tile of every chunk: the persistent loops cover the whole table.
    sizes = split_rows(M, 3)
    a, b = randn(M, K, dtype=torch.float32, seed=1), randn(K, N, dtype=torch.float32, seed=2)
    out = torch.full((M, N), float("nan"))
    ag_matmul(a, b, sizes, 1, torch.full((3,), 2, dtype=torch.uint32), 2, out=out, max_programs=1)
    assert_close(out, a.double() @ b.double(), torch.float32, "ag_matmul, one program")
    sim = SimulatedRS(sizes, N, torch.float32, "cpu")
    recv_offsets = torch.tensor([j * sim.recv[0].numel() for j in range(3)], dtype=torch.int64)
    flag_offsets = torch.tensor([3 * j for j in range(3)], dtype=torch.int64)
    odykernels.matmul_rs(a, b, sizes, 0, sim.recv[0], recv_offsets, sim.flags[0], flag_offsets, 1, max_programs=1)
    starts = chunk_starts(sizes)
    for d in range(3):
        assert sim.flags[d].tolist() == [1, 0, 0]
        assert_close(
            sim.recv[d, 0, : sizes[d]], (a.double() @ b.double())[starts[d] : starts[d + 1]], torch.float32, "slot"
        )
    with pytest.raises(ValueError, match="max_programs=0 must be >= 1"):
        ag_matmul(a, b, sizes, 1, torch.ones(3, dtype=torch.uint32), 1, max_programs=0)


def test_ag_matmul_times_out_naming_rank_and_chunk():
    a_full, b = randn(M, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    flags = torch.tensor([1, 0, 1], dtype=torch.uint32)  # chunk 1 never lands
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank 2 timed out waiting for chunk 1: its flag read 0, expected 1"):
        ag_matmul(a_full, b, split_rows(M, 3), 2, flags, expected=1, timeout_s=0.004)
    assert time.monotonic() - start < 30


def test_ag_matmul_stale_epoch_times_out():
    # Flags left at epoch 4 by the previous call do not satisfy a wait for epoch 5.
    a_full, b = randn(M, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    flags = torch.tensor([5, 4], dtype=torch.uint32)
    with pytest.raises(TimeoutError, match=r"rank 0 timed out waiting for chunk 1: its flag read 4, expected 5"):
        ag_matmul(a_full, b, split_rows(M, 2), 0, flags, expected=5, timeout_s=0.002)


def test_ag_matmul_unchecked_launch_reports_later():
    a_full, b = randn(M, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    flags = torch.tensor([0, 3], dtype=torch.uint32)
    with pytest.raises(ValueError, match="check=False needs a status tensor"):
        ag_matmul(a_full, b, split_rows(M, 2), 1, flags, expected=3, check=False)
    status = new_status("cpu")
    ag_matmul(a_full, b, split_rows(M, 2), 1, flags, expected=3, timeout_s=0.002, status=status, check=False)
    code, seen, expected, _ = status.tolist()
    assert (code, seen, expected) == (1, 0, 3)  # 1 + chunk 0
    with pytest.raises(TimeoutError, match="rank 1 timed out waiting for chunk 0"):
        check_status(status, 1, "ag_matmul")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunk_sizes=[30, 30]), r"chunk_sizes \[30, 30\] sum to 60, expected 61 rows"),
        (dict(rank=2), "rank 2 out of range for world size 2"),
        (dict(flags=torch.zeros(2, dtype=torch.int32)), r"flags must be uint32 \[2\] on cpu, got torch.int32"),
        (dict(flags=torch.zeros(4, dtype=torch.uint32)[::2]), r"flags must be contiguous"),
        (dict(timeout_s=0), r"timeout_s=0 must be in"),
        (dict(expected=0), "expected=0 must be in"),
    ],
)
def test_ag_matmul_rejects_bad_arguments(kwargs, message):
    args = dict(
        a_full=torch.zeros(M, K), b=torch.zeros(K, N), chunk_sizes=split_rows(M, 2), rank=0,
        flags=torch.ones(2, dtype=torch.uint32), expected=1,
    )  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ag_matmul(**args)


# ----------------------------------------------------------------------------- matmul_rs, reduce_slots


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_matmul_rs_numerics(dtype, world):
    # Each rank holds its own slice of K; slices differ in width (40, 24, 17, 9).
    widths = [40, 24, 17, 9][:world]
    a = [randn(M, w, dtype=dtype, seed=10 + r) for r, w in enumerate(widths)]
    b = [randn(w, N, dtype=dtype, seed=20 + r) for r, w in enumerate(widths)]
    ref = sum(x.double() @ y.double() for x, y in zip(a, b))
    outs = simulate_matmul_rs(a, b, world)
    starts = chunk_starts(split_rows(M, world))
    for d, out in enumerate(outs):
        assert_close(out, ref[starts[d] : starts[d + 1]], dtype, f"rs world {world} rank {d}")


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_slots_sums_in_source_order_numerics(world):
    # fp32 partials of very different magnitudes: the result must be bitwise the left-to-right fp32 sum
    # slot 0 + slot 1 + ..., which an fp64 sum or another order would not reproduce exactly.
    sizes = split_rows(M, world)
    rank = world - 1
    recv = torch.full((world, max(sizes), N), float("nan"))
    rows = sizes[rank]
    for s in range(world):
        recv[s, :rows] = randn(rows, N, dtype=torch.float32, seed=30 + s) * 10.0 ** (4 * s)
    flags = torch.full((world,), 9, dtype=torch.uint32)
    out = torch.full((rows, N), float("nan"))
    reduce_slots(recv, flags, sizes, rank, epoch=9, out=out)
    expected = torch.zeros(rows, N)
    for s in range(world):
        expected = expected + recv[s, :rows]
    assert torch.equal(out, expected)
    assert_close(out, recv[:, :rows].double().sum(0), torch.float32, "fp64 sum")


def test_reduce_slots_to_fp16_numerics():
    sizes = split_rows(M, 3)
    recv = torch.full((3, max(sizes), N), float("nan"))
    recv[:, : sizes[0]] = randn(3, sizes[0], N, dtype=torch.float32, seed=4)
    out = torch.full((sizes[0], N), float("nan"), dtype=torch.float16)
    reduce_slots(recv, torch.full((3,), 2, dtype=torch.uint32), sizes, 0, epoch=2, out=out)
    assert_close(out, recv[:, : sizes[0]].double().sum(0), torch.float16, "fp32 slots to fp16")


def test_matmul_rs_reuses_buffers_across_epochs_numerics():
    world, sizes = 3, split_rows(M, 3)
    starts = chunk_starts(sizes)
    sim = SimulatedRS(sizes, N, torch.float32, "cpu")
    for epoch in (1, 2):
        a = [randn(M, K, dtype=torch.float32, seed=40 + 3 * epoch + r) for r in range(world)]
        b = [randn(K, N, dtype=torch.float32, seed=50 + 3 * epoch + r) for r in range(world)]
        ref = sum(x.double() @ y.double() for x, y in zip(a, b))
        if epoch == 2:
            # Before this epoch's producers run, the flags still say 1: the reduction must not accept them.
            with pytest.raises(TimeoutError, match="rank 0 timed out waiting for source 0: its flag read 1"):
                sim.reduce(0, epoch, timeout_s=0.001)
        for r in range(world):
            sim.produce(r, a[r], b[r], epoch)
        assert torch.equal(sim.counters, torch.zeros_like(sim.counters)), "counters must be left zeroed"
        assert sim.flags.tolist() == [[epoch] * world] * world
        for d in range(world):
            assert_close(sim.reduce(d, epoch), ref[starts[d] : starts[d + 1]], torch.float32, f"epoch {epoch}")


def test_matmul_rs_rank_with_empty_k_slice_numerics():
    # Rank 1 holds no columns of K: its partial is zero but must still be sent, or rank 0 would wait forever.
    a = [randn(M, K, dtype=torch.float32, seed=1), torch.zeros(M, 0)]
    b = [randn(K, N, dtype=torch.float32, seed=2), torch.zeros(0, N)]
    ref = a[0].double() @ b[0].double()
    starts = chunk_starts(split_rows(M, 2))
    for d, out in enumerate(simulate_matmul_rs(a, b, 2)):
        assert_close(out, ref[starts[d] : starts[d + 1]], torch.float32, f"rank {d}")


def test_reduce_slots_times_out_naming_missing_source():
    sizes = split_rows(M, 3)
    sim = SimulatedRS(sizes, N, torch.float32, "cpu")
    for r in (0, 2):  # source 1 never produces
        sim.produce(r, randn(M, K, dtype=torch.float32, seed=r), randn(K, N, dtype=torch.float32, seed=9), 1)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"reduce_slots: rank 2 timed out waiting for source 1: its flag read 0"):
        sim.reduce(2, 1, timeout_s=0.004)
    assert time.monotonic() - start < 30


def test_matmul_rs_rejects_bad_arguments():
    sizes = split_rows(M, 2)
    a, b = torch.zeros(M, K), torch.zeros(K, N)
    offsets = torch.zeros(2, dtype=torch.int64)
    flags = torch.zeros(2, dtype=torch.uint32)
    with pytest.raises(ValueError, match=r"recv has shape \[2, 10, 24\], expected \[2, >= 31, 24\]"):
        odykernels.matmul_rs(a, b, sizes, 0, torch.zeros(2, 10, N), offsets, flags, offsets, 1)
    with pytest.raises(ValueError, match=r"peer_offsets must be int64 \[2\]"):
        odykernels.matmul_rs(a, b, sizes, 0, torch.zeros(2, 31, N), offsets.int(), flags, offsets, 1)
    with pytest.raises(ValueError, match="epoch=0 must be in"):
        odykernels.matmul_rs(a, b, sizes, 0, torch.zeros(2, 31, N), offsets, flags, offsets, 0)


# ------------------------------------------------------------------------ TRITON_INTERPRET=1 process


def test_env_interpreter_mode_numerics():
    # With TRITON_INTERPRET=1 set before triton is imported the kernels are interpreted from the start;
    # the launchers must accept that mode too.
    code = (
        "import torch\n"
        "from odykernels import matmul\n"
        "from odykernels.testing import simulate_ag_matmul, simulate_matmul_rs\n"
        "a = torch.randn(37, 20); b = torch.randn(20, 18)\n"
        "ref = a.double() @ b.double()\n"
        "err = [(matmul(a, b).double() - ref).abs().max().item()]\n"
        "err += [(simulate_ag_matmul(a, b, 3, r).double() - ref).abs().max().item() for r in range(3)]\n"
        "outs = simulate_matmul_rs([a, a], [b, 2 * b], 2)\n"
        "err.append((torch.cat(outs).double() - 3 * ref).abs().max().item())\n"
        "assert max(err) < 1e-4, err\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------- GPU (gated)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@gpu
@pytest.mark.parametrize("shape", [(M, K, N), (1000, 520, 1030), (4096, 1024, 1536)], ids=str)
def test_matmul_gpu_bf16_numerics(shape):
    m, k, n = shape
    a, b = randn(m, k, dtype=torch.bfloat16, device="cuda"), randn(k, n, dtype=torch.bfloat16, device="cuda", seed=1)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    matmul(a, b, out=out)
    cublas = a @ b
    assert not out.isnan().any()
    assert _rel(out, cublas) < 1e-2
    assert _rel(out, a.double() @ b.double()) < 1e-2


@gpu
@pytest.mark.parametrize("world", WORLDS)
def test_ag_matmul_gpu_bf16_numerics(world):
    m = 61 * 37  # 2257 rows: uneven chunks, partial tiles at every chunk end
    a, b = randn(m, 512, dtype=torch.bfloat16, device="cuda"), randn(512, 384, dtype=torch.bfloat16, device="cuda")
    cublas = a @ b
    for rank in range(world):
        got = simulate_ag_matmul(a, b, world, rank)
        assert not got.isnan().any()
        assert _rel(got, cublas) < 1e-2, f"rank {rank}"


@gpu
@pytest.mark.parametrize("world", WORLDS)
def test_matmul_rs_gpu_bf16_numerics(world):
    m = 61 * 37
    a = [randn(m, 256, dtype=torch.bfloat16, device="cuda", seed=r) for r in range(world)]
    b = [randn(256, 320, dtype=torch.bfloat16, device="cuda", seed=10 + r) for r in range(world)]
    ref = sum((x @ y).float() for x, y in zip(a, b))
    starts = chunk_starts(split_rows(m, world))
    for d, out in enumerate(simulate_matmul_rs(a, b, world)):
        assert not out.isnan().any()
        assert _rel(out, ref[starts[d] : starts[d + 1]]) < 1e-2, f"rank {d}"


@gpu
def test_ag_matmul_gpu_timeout():
    a, b = randn(256, 64, dtype=torch.bfloat16, device="cuda"), randn(64, 64, dtype=torch.bfloat16, device="cuda")
    flags = torch.tensor([1, 0], dtype=torch.uint32, device="cuda")
    with pytest.raises(TimeoutError, match="rank 0 timed out waiting for chunk 1"):
        ag_matmul(a, b, split_rows(256, 2), 0, flags, expected=1, timeout_s=0.001)


@gpu
def test_ag_matmul_gpu_late_flag_numerics():
    # The flag of chunk 1 is set by another stream ~30 ms after the kernel starts: the wait must poll
    # until it lands (the interpreter, running one thing at a time, cannot show this).
    a, b = randn(512, 256, dtype=torch.bfloat16, device="cuda"), randn(256, 256, dtype=torch.bfloat16, device="cuda")
    flags = torch.tensor([1, 0], dtype=torch.uint32, device="cuda")
    compute, late = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(late):
        torch.cuda._sleep(50_000_000)
        flags[1].fill_(1)
    with torch.cuda.stream(compute):
        status = new_status("cuda")
        out = ag_matmul(a, b, split_rows(512, 2), 0, flags, expected=1, status=status, check=False)
    torch.cuda.synchronize()
    check_status(status, 0, "ag_matmul")
    assert _rel(out, a @ b) < 1e-2


@gpu
def test_reduce_slots_gpu_late_producers_numerics():
    # Reductions are queued first on their own stream; the producers run later on another.
    world, m = 3, 1000
    sizes = split_rows(m, world)
    sim = SimulatedRS(sizes, 256, torch.bfloat16, "cuda")
    a = [randn(m, 128, dtype=torch.bfloat16, device="cuda", seed=r) for r in range(world)]
    b = [randn(128, 256, dtype=torch.bfloat16, device="cuda", seed=5 + r) for r in range(world)]
    reducing, producing = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    outs, statuses = [], []
    with torch.cuda.stream(reducing):
        for d in range(world):
            statuses.append(new_status("cuda"))
            outs.append(reduce_slots(sim.recv[d], sim.flags[d], sizes, d, epoch=1, status=statuses[-1], check=False))
    with torch.cuda.stream(producing):
        torch.cuda._sleep(50_000_000)
        for r in range(world):
            sim.produce(r, a[r], b[r], epoch=1)
    torch.cuda.synchronize()
    ref = sum((x @ y).float() for x, y in zip(a, b))
    starts = chunk_starts(sizes)
    for d in range(world):
        check_status(statuses[d], d, "reduce_slots", index_name="source")
        assert _rel(outs[d], ref[starts[d] : starts[d + 1]]) < 1e-2, f"rank {d}"
