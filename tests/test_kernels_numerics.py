"""odykernels against fp64 references: CPU tensors through the Triton interpreter, CUDA tensors (gated) compiled.

CPU cases use fp32 and fp16 only: the interpreter computes bf16 wrongly (the launchers refuse it there).
Outputs and receive buffers start as NaN, so a tile a kernel never wrote fails the comparison.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

import odykernels
from odykernels import ag_matmul, check_status, matmul, new_status, reduce_slots, split_rows
from odykernels._chunks import CHUNK, ROW_END, ROW_START, chunk_starts, mtile_table
from odykernels.ag_matmul import _ag_matmul_kernel, _ag_matmul_tma_kernel
from odykernels.matmul import (
    DISABLED_CONFIGS,
    INTERPRETER_CONFIG,
    SM80_CONFIGS,
    SM90_CONFIGS,
    TileConfig,
    autotune,
    candidate_configs,
    prepare_matmul,
    prune_configs,
    regime,
    select_config,
)
from odykernels.matmul_rs import _matmul_rs_kernel, _matmul_rs_tma_kernel, _reduce_slots_kernel
from odykernels.testing import SimulatedRS, simulate_ag_matmul, simulate_matmul_rs

# The module, not the function odykernels exports under the same name.
matmul_module = importlib.import_module("odykernels.matmul")

CPU_DTYPES = [torch.float32, torch.float16]
# (atol, rtol) against an fp64 reference of the same (rounded) inputs; fp16 covers one rounding of the output
# plus, for matmul_rs, one rounding of each partial in the 16-bit receive buffer.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-2, 4e-3), torch.bfloat16: (1e-2, 1e-2)}
# Ragged on purpose: 61 rows over 3 ranks is 21/20/20; K=40 and N=24 are not multiples of the 16-wide
# interpreter tiles; world 4 with 61 rows gives 16/15/15/15.
M, K, N = 61, 40, 24
WORLDS = [1, 2, 3, 4]
# Both code paths run under the interpreter: "tma" (tensor descriptors, the flattened loop, ag_matmul's
# flag lookahead) needs K and N rows of 16 bytes, which M, K, N above give in fp32 and fp16.
PATHS = ["pointer", "tma"]

gpu = pytest.mark.gpu  # skipped without CUDA (conftest); run by perf/gpu_check.sh


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
    "shape, path",
    [((M, K, N), "pointer"), ((M, K, N), "tma"), ((16, 16, 16), "tma"), ((5, 7, 3), None), ((33, 70, 50), None),
     ((40, 56, 72), "tma")],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)  # fmt: skip
def test_matmul_numerics(dtype, shape, path):
    # path None: automatic, which is the pointer path under the interpreter (and for these unaligned rows).
    m, k, n = shape
    a, b = randn(m, k, dtype=dtype, seed=1), randn(k, n, dtype=dtype, seed=2)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    got = matmul(a, b, out=out, path=path)
    assert got is out
    assert_close(got, a.double() @ b.double(), dtype, f"matmul {shape} {dtype} {path}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_matmul_strided_and_fp32_out_numerics(dtype):
    # Column-major A, a B that is a strided view, an fp32 output with padded rows.
    a = randn(K, M, dtype=dtype, seed=3).t()
    b = randn(N, 2 * K, dtype=dtype, seed=4).t()[::2]
    out = torch.full((M, N + 5), float("nan"), dtype=torch.float32)[:, :N]
    matmul(a, b, out=out)
    assert_close(out, a.double() @ b.double(), torch.float32 if dtype == torch.float32 else dtype, "strided")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("a_col_major", [False, True], ids=["a_rows", "a_cols"])
@pytest.mark.parametrize("b_k_contiguous", [False, True], ids=["b_rows", "b_weight_t"])
def test_matmul_tma_layouts_numerics(dtype, a_col_major, b_k_contiguous):
    # The descriptor path in every operand layout it takes: A row- or column-major, B row-major or
    # K-contiguous (an nn.Linear weight, transposed). 48 rows keep A's column stride 16-byte aligned.
    m = 48
    a = randn(K, m, dtype=dtype, seed=5).t() if a_col_major else randn(m, K, dtype=dtype, seed=5)
    b = randn(N, K, dtype=dtype, seed=6).t() if b_k_contiguous else randn(K, N, dtype=dtype, seed=6)
    padded = torch.full((m, N + 8), float("nan"), dtype=dtype)  # rows padded, 16-byte aligned
    out = padded[:, :N]
    matmul(a, b, out=out, path="tma")
    assert_close(out, a.double() @ b.double(), dtype, f"tma a_col_major={a_col_major} b_k={b_k_contiguous}")
    assert padded[:, N:].isnan().all(), "the row padding past N must not be written"


def test_matmul_path_choice_and_errors():
    a, b = randn(M, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    launch = prepare_matmul(a, b)
    assert launch.kernel is matmul_module._matmul_kernel  # interpreter default: the pointer path
    assert prepare_matmul(a, b, path="tma").kernel is matmul_module._matmul_tma_kernel
    with pytest.raises(ValueError, match=r"path='fast'; expected one of \['tma', 'pointer'\]"):
        matmul(a, b, path="fast")
    odd = randn(M, 7, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"path='tma' cannot load these operands: a has strides \(7, 1\)"):
        matmul(odd, randn(7, N, dtype=torch.float16), path="tma")
    # K = 0 is zeros without a launch; matmul_rs still launches (it must send zeros), on the pointer path.
    assert torch.equal(matmul(torch.empty(3, 0), torch.empty(0, 4), path="tma"), torch.zeros(3, 4))
    sim = SimulatedRS([3], 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="matmul_rs: path='tma' cannot load these operands: K is 0"):
        sim.produce(0, torch.empty(3, 0), torch.empty(0, 4), 1, path="tma")


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
    h100 = select_config(8192, 4096, 4096, 2, (9, 0), 132, path="tma")
    assert (h100.block_m, h100.block_n, h100.block_k, h100.num_stages) == (128, 256, 64, 3)
    assert select_config(8192, 4096, 4096, 2, (9, 0), 132, path="tma") == h100
    # o_proj at world 8 (K = 512) takes the fourth stage; N = d/8 = 512 the 128x128 tiles.
    assert select_config(8192, 4096, 512, 2, (9, 0), 132, path="tma").num_stages == 4
    narrow = select_config(8192, 512, 4096, 2, (9, 0), 132, path="tma")
    assert (narrow.block_m, narrow.block_n) == (128, 128)
    # A problem with fewer tiles than SMs takes the config that makes the most tiles.
    small = select_config(256, 256, 4096, 2, (9, 0), 132, path="tma")
    assert (small.block_m, small.block_n) == (64, 64)
    assert select_config(256, 256, 4096, 2, (8, 0), 108) == TileConfig(64, 64, 64, 8, 4, 4)
    # fp32 tiles of 128x256x64 over 3 stages need 288 KiB: more than any card has.
    for configs in SM80_CONFIGS.values():
        assert all(c.smem_bytes(4) <= 166912 for c in prune_configs(configs, 4096, 4096, 4096, 4, (8, 0)))
    # An fp32 receive buffer needs the whole fp32 tile as epilogue scratch on the TMA path: no 128x256 there.
    fp32_out = candidate_configs(8192, 4096, 4096, 2, (9, 0), 132, out_elem_size=4, path="tma")
    assert fp32_out == [TileConfig(128, 128, 64, 8, 8, 4)]
    assert select_config(5, 5, 5, 2, None, 1) == INTERPRETER_CONFIG
    # On CPU the launchers never tune: the interpreter config, whatever the shape.
    assert prepare_matmul(randn(M, K, dtype=torch.float32), randn(K, N, dtype=torch.float32)).kwargs["BLOCK_M"] == 16


def test_config_tables():
    assert [regime(512, 4096, 4096), regime(8192, 512, 4096), regime(8192, 4096, 512), regime(8192, 4096, 4096)] == [
        "small_m", "narrow_n", "short_k", "large",
    ]  # fmt: skip
    for table in (SM90_CONFIGS, SM80_CONFIGS):
        assert set(table) == {"small_m", "narrow_n", "short_k", "large"}
        for configs in table.values():
            assert 1 <= len(configs) <= 4 and len(set(configs)) == len(configs)
    enabled = {c for table in (SM90_CONFIGS, SM80_CONFIGS) for configs in table.values() for c in configs}
    for cfg, reason in DISABLED_CONFIGS:
        assert cfg not in enabled and len(reason) > 20, (cfg, reason)
    # Every enabled sm_90 config fits the H100 with 16-bit data on the TMA path.
    assert all(c.smem_bytes(2, 2, "tma") <= 232448 for configs in SM90_CONFIGS.values() for c in configs)


def test_autotune_picks_the_fastest_and_caches(monkeypatch):
    monkeypatch.setattr(matmul_module, "_TUNED", {})
    a, b, c = (TileConfig(128, 256, 64, 8, 8, s) for s in (3, 4, 5))
    times = {a: 2.0, b: 1.0}
    runs = []

    def run(cfg):
        runs.append(cfg)
        if cfg == c:
            raise matmul_module.triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    def bench(fn):
        fn()
        return times[runs[-1]]

    assert autotune(("key",), [a, b, c], run, bench) == b
    assert runs == [a, b, c]
    assert autotune(("key",), [a, b, c], run, bench=None) == b  # cached: no new runs, no do_bench
    assert runs == [a, b, c]
    with pytest.raises(RuntimeError, match="no candidate config could run"):
        autotune(("other",), [c], run, bench)


def test_launch_metadata_reports_flops_and_bytes():
    a, b = torch.zeros(64, 32, dtype=torch.float16), torch.zeros(32, 48, dtype=torch.float16)
    out = torch.zeros(64, 48, dtype=torch.float32)
    for kernel, a_arg, b_arg, path in [
        (matmul_module._matmul_kernel, a, b, "pointer"),
        (matmul_module._matmul_tma_kernel, *prepare_matmul(a, b, path="tma").args[:2], "tma"),
    ]:
        hook = kernel.launch_metadata
        key_a, key_b = ("a_desc", "b_desc") if path == "tma" else ("a_ptr", "b_ptr")
        meta = hook((1,), kernel, {key_a: a_arg, key_b: b_arg, "c_ptr": out})
        assert meta["name"] == f"odykernels.matmul[{path}] M=64 N=48 K=32"
        assert meta["flops"] == meta["flops16"] == 2 * 64 * 48 * 32
        assert meta["bytes"] == 2 * 64 * 32 + 2 * 32 * 48 + 4 * 64 * 48
    kernels = [
        matmul_module._matmul_kernel, matmul_module._matmul_tma_kernel, _ag_matmul_kernel, _ag_matmul_tma_kernel,
        _matmul_rs_kernel, _matmul_rs_tma_kernel, _reduce_slots_kernel,
    ]  # fmt: skip
    assert all(k.launch_metadata is not None for k in kernels)
    recv = torch.zeros(3, 10, 48)
    meta = _reduce_slots_kernel.launch_metadata((1,), None, {"recv_ptr": recv, "out_ptr": out[:10], "world": 3})
    assert meta["flops"] == 2 * 10 * 48 and meta["bytes"] == 3 * 10 * 48 * 4 + 10 * 48 * 4


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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_ag_matmul_numerics(dtype, world, path):
    a_full, b = randn(M, K, dtype=dtype, seed=5), randn(K, N, dtype=dtype, seed=6)
    ref = a_full.double() @ b.double()
    for rank in range(world):
        got = simulate_ag_matmul(a_full, b, world, rank, path=path)
        assert_close(got, ref, dtype, f"ag world {world} rank {rank} {path}")


@pytest.mark.parametrize("k", [16, 48, 80], ids=lambda k: f"K{k}")
def test_ag_matmul_tma_lookahead_numerics(k):
    # K = 16, 48, 80 are 1, 3 and 5 K steps per tile: the flag lookahead (3 iterations under the
    # interpreter) then spans several tiles, exactly one tile, or falls inside a tile. The own chunk's
    # flag holds garbage: it must never be read.
    world, rank = 4, 2
    a_full, b = randn(M, k, dtype=torch.float32, seed=7), randn(k, 32, dtype=torch.float32, seed=8)
    flags = torch.full((world,), 5, dtype=torch.uint32)
    flags[rank] = 0xDEAD
    for progs in (1, 2, 3):
        out = torch.full((M, 32), float("nan"))
        ag_matmul(a_full, b, split_rows(M, world), rank, flags, 5, out=out, max_programs=progs, path="tma")
        assert_close(out, a_full.double() @ b.double(), torch.float32, f"K={k} programs={progs}")


def test_ag_matmul_empty_chunks_and_epoch_numerics():
    # 3 rows over 4 ranks: rank 3 owns nothing; flags hold epoch 7 as a finished seventh call leaves them.
    a_full, b = randn(3, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    for rank in range(4):
        got = simulate_ag_matmul(a_full, b, 4, rank, epoch=7)
        assert_close(got, a_full.double() @ b.double(), torch.float32, f"rank {rank}")


@pytest.mark.parametrize("path", PATHS)
def test_fused_kernels_with_one_program_numerics(path):
    # One program walks every tile of every chunk: the persistent loops cover the whole table.
    sizes = split_rows(M, 3)
    a, b = randn(M, K, dtype=torch.float32, seed=1), randn(K, N, dtype=torch.float32, seed=2)
    out = torch.full((M, N), float("nan"))
    ag_matmul(a, b, sizes, 1, torch.full((3,), 2, dtype=torch.uint32), 2, out=out, max_programs=1, path=path)
    assert_close(out, a.double() @ b.double(), torch.float32, "ag_matmul, one program")
    sim = SimulatedRS(sizes, N, torch.float32, "cpu")
    recv_offsets = torch.tensor([j * sim.recv.stride(0) for j in range(3)], dtype=torch.int64)
    flag_offsets = torch.tensor([3 * j for j in range(3)], dtype=torch.int64)
    odykernels.matmul_rs(
        a, b, sizes, 0, sim.recv[0], recv_offsets, sim.flags[0], flag_offsets, 1, max_programs=1, path=path
    )
    starts = chunk_starts(sizes)
    for d in range(3):
        assert sim.flags[d].tolist() == [1, 0, 0]
        assert_close(
            sim.recv[d, 0, : sizes[d]], (a.double() @ b.double())[starts[d] : starts[d + 1]], torch.float32, "slot"
        )
    with pytest.raises(ValueError, match="max_programs=0 must be >= 1"):
        ag_matmul(a, b, sizes, 1, torch.ones(3, dtype=torch.uint32), 1, max_programs=0)


@pytest.mark.parametrize("path", PATHS)
def test_ag_matmul_times_out_naming_rank_and_chunk(path):
    a_full, b = randn(M, K, dtype=torch.float32), randn(K, N, dtype=torch.float32, seed=1)
    flags = torch.tensor([1, 0, 1], dtype=torch.uint32)  # chunk 1 never lands
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank 2 timed out waiting for chunk 1: its flag read 0, expected 1"):
        ag_matmul(a_full, b, split_rows(M, 3), 2, flags, expected=1, timeout_s=0.004, path=path)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("path", PATHS)
def test_ag_matmul_waits_for_a_concurrent_producer_numerics(path):
    # A thread plays the all-gather: it writes each remote chunk's rows, then that chunk's flag, while the
    # kernel runs. The interpreter reads CPU tensors in place, so this is real concurrency: a tile that
    # loaded its rows before their flag would see the NaN they start as.
    world, rank = 4, 1
    sizes = split_rows(M, world)
    starts = chunk_starts(sizes)
    src, b = randn(M, K, dtype=torch.float32, seed=3), randn(K, N, dtype=torch.float32, seed=4)
    a_full = torch.full((M, K), float("nan"))
    a_full[starts[rank] : starts[rank + 1]] = src[starts[rank] : starts[rank + 1]]
    flags = torch.zeros(world, dtype=torch.uint32)

    def all_gather():
        for step in range(1, world):
            c = (rank + step) % world
            time.sleep(0.05)
            a_full[starts[c] : starts[c + 1]] = src[starts[c] : starts[c + 1]]
            flags[c] = 3

    producer = threading.Thread(target=all_gather)
    producer.start()
    try:
        out = ag_matmul(a_full, b, sizes, rank, flags, 3, out=torch.full((M, N), float("nan")), timeout_s=60, path=path)
    finally:
        producer.join()
    assert_close(out, src.double() @ b.double(), torch.float32, f"concurrent producer, {path}")


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


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_matmul_rs_tma_numerics(dtype, world):
    # The descriptor path: K slices of 16-byte rows (40, 24, 16, 8 columns), B as a transposed weight,
    # N = 20 so the 16-byte-padded receive rows have padding the kernel may write.
    widths = [40, 24, 16, 8][:world]
    a = [randn(M, w, dtype=dtype, seed=10 + r) for r, w in enumerate(widths)]
    b = [randn(20, w, dtype=dtype, seed=20 + r).t() for r, w in enumerate(widths)]
    ref = sum(x.double() @ y.double() for x, y in zip(a, b))
    outs = simulate_matmul_rs(a, b, world, path="tma")
    starts = chunk_starts(split_rows(M, world))
    for d, out in enumerate(outs):
        assert_close(out, ref[starts[d] : starts[d + 1]], dtype, f"rs tma world {world} rank {d}")


def test_matmul_rs_fp16_into_fp32_slots_numerics():
    # 16-bit operands, fp32 receive buffer (partials unrounded before the sum), both paths.
    sizes = split_rows(M, 2)
    starts = chunk_starts(sizes)
    a = [randn(M, K, dtype=torch.float16, seed=r) for r in range(2)]
    b = [randn(K, N, dtype=torch.float16, seed=5 + r) for r in range(2)]
    ref = sum(x.double() @ y.double() for x, y in zip(a, b))
    for path in PATHS:
        sim = SimulatedRS(sizes, N, torch.float32, "cpu")
        for r in range(2):
            sim.produce(r, a[r], b[r], 1, path=path)
        for d in range(2):
            assert_close(sim.reduce(d, 1), ref[starts[d] : starts[d + 1]], torch.float32, f"fp32 slots {path}")


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


def test_matmul_rs_enforces_the_16_byte_rule():
    # One rule on every device: recv address, slot and row strides, peer offsets in 16-byte multiples.
    sizes = split_rows(M, 2)
    a, b = torch.zeros(M, K, dtype=torch.float16), torch.zeros(K, 20, dtype=torch.float16)
    zero, flags = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.uint32)

    def run(recv, offsets=zero):
        odykernels.matmul_rs(a, b, sizes, 0, recv, offsets, flags, zero, 1)

    with pytest.raises(ValueError, match=r"recv's row stride is 20 elements = 40 bytes, expected a multiple of 16"):
        run(torch.zeros(2, 31, 20, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"recv's slot stride is 748 elements = 1496 bytes"):
        run(torch.zeros(2 * 748, dtype=torch.float16).as_strided((2, 31, 20), (748, 24, 1)))
    with pytest.raises(ValueError, match=r"recv starts at address 0x[0-9a-f]+, 2 bytes past a 16-byte boundary"):
        run(torch.zeros(2 * 32 * 24 + 8, dtype=torch.float16)[1:].as_strided((2, 31, 20), (32 * 24, 24, 1)))
    with pytest.raises(ValueError, match=r"recv has strides \(1488, 1, 31\); expected a column stride of 1"):
        run(torch.zeros(2 * 1488, dtype=torch.float16).as_strided((2, 31, 20), (1488, 1, 31)))
    recv = torch.zeros(2, 32, 24, dtype=torch.float16)[:, :31, :20]
    with pytest.raises(ValueError, match=r"peer_offsets\[1\] = 4 elements = 8 bytes, expected a multiple of 16"):
        run(recv, torch.tensor([0, 4]))
    offsets = torch.tensor([0, 8])
    run(recv, offsets)  # aligned: accepted, and the verdict is cached for this tensor
    offsets[1] = 12  # an in-place change bumps the version: checked again
    with pytest.raises(ValueError, match=r"peer_offsets\[1\] = 12 elements"):
        run(recv, offsets)


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
        "a16, b16 = a[:, :16], torch.randn(16, 24)\n"
        "ref16 = a16.double() @ b16.double()\n"
        "err.append((matmul(a16, b16, path='tma').double() - ref16).abs().max().item())\n"
        "outs = simulate_matmul_rs([a16, a16], [b16, b16], 2, path='tma')\n"
        "err.append((torch.cat(outs).double() - 2 * ref16).abs().max().item())\n"
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
@pytest.mark.parametrize("path", [None, "pointer"], ids=["auto", "pointer"])
@pytest.mark.parametrize("b_weight_t", [False, True], ids=["b_rows", "b_weight_t"])
@pytest.mark.parametrize("shape", [(M, K, N), (1000, 520, 1030), (4096, 1024, 1536)], ids=str)
def test_matmul_gpu_bf16_numerics(shape, b_weight_t, path):
    # auto: the TMA path on sm_90 where the rows allow it (row-major B of 1000 x 520 x 1030 has 2060-byte
    # rows: not 16-byte aligned, so it falls back; as weight.t() its rows are 1040 bytes and TMA takes it,
    # with a K tail), the pointer path elsewhere. An N of 1030 also leaves the output stores unvectorized.
    m, k, n = shape
    a = randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = randn(n, k, dtype=torch.bfloat16, device="cuda", seed=1).t() if b_weight_t else randn(k, n, seed=1,
        dtype=torch.bfloat16, device="cuda")  # fmt: skip
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    matmul(a, b, out=out, path=path)
    cublas = a @ b
    assert not out.isnan().any()
    assert _rel(out, cublas) < 1e-2
    assert _rel(out, a.double() @ b.double()) < 1e-2


@gpu
def test_matmul_gpu_autotunes_once_per_shape_key(monkeypatch):
    monkeypatch.setattr(matmul_module, "AUTOTUNE", True)
    monkeypatch.setattr(matmul_module, "_TUNED", {})
    a, b = (
        randn(3000, 4096, dtype=torch.bfloat16, device="cuda"),
        randn(4096, 2048, dtype=torch.bfloat16, device="cuda"),
    )
    out = matmul(a, b)
    assert len(matmul_module._TUNED) == 1 and _rel(out, a @ b) < 1e-2
    matmul(a[:2900], b)  # same power-of-two bucket of M: no new tuning
    assert len(matmul_module._TUNED) == 1


@gpu
@pytest.mark.parametrize("path", [None, "pointer"], ids=["auto", "pointer"])
@pytest.mark.parametrize("world", WORLDS)
def test_ag_matmul_gpu_bf16_numerics(world, path):
    m = 61 * 37  # 2257 rows: uneven chunks, partial tiles at every chunk end
    a, b = randn(m, 512, dtype=torch.bfloat16, device="cuda"), randn(512, 384, dtype=torch.bfloat16, device="cuda")
    cublas = a @ b
    for rank in range(world):
        got = simulate_ag_matmul(a, b, world, rank, path=path)
        assert not got.isnan().any()
        assert _rel(got, cublas) < 1e-2, f"rank {rank}"


@gpu
@pytest.mark.parametrize("path", [None, "pointer"], ids=["auto", "pointer"])
@pytest.mark.parametrize("world", WORLDS)
def test_matmul_rs_gpu_bf16_numerics(world, path):
    m = 61 * 37
    a = [randn(m, 256, dtype=torch.bfloat16, device="cuda", seed=r) for r in range(world)]
    b = [randn(256, 320, dtype=torch.bfloat16, device="cuda", seed=10 + r) for r in range(world)]
    ref = sum((x @ y).float() for x, y in zip(a, b))
    starts = chunk_starts(split_rows(m, world))
    for d, out in enumerate(simulate_matmul_rs(a, b, world, path=path)):
        assert not out.isnan().any()
        assert _rel(out, ref[starts[d] : starts[d + 1]]) < 1e-2, f"rank {d}"


@gpu
@pytest.mark.parametrize("path", [None, "pointer"], ids=["auto", "pointer"])
def test_ag_matmul_gpu_copy_engine_producer_numerics(path):
    # The all-gather as the symmetric-memory backend runs it: a side stream copies each remote chunk with a
    # copy-engine copy, then writes its flag (a 4-byte device-to-device copy: no SM needed), ~25 ms after
    # the kernel started. Remote rows start as NaN: a tile that read them before its flag (a lookahead too
    # short for the pipeline, a missing proxy fence) leaves NaN or stale values in the output.
    world, rank, m = 8, 3, 8192
    sizes = split_rows(m, world)
    starts = chunk_starts(sizes)
    src = randn(m, 1024, dtype=torch.bfloat16, device="cuda")
    b = randn(2048, 1024, dtype=torch.bfloat16, device="cuda", seed=1).t()
    a_full = torch.full_like(src, float("nan"))
    a_full[starts[rank] : starts[rank + 1]] = src[starts[rank] : starts[rank + 1]]
    flags = torch.zeros(world, dtype=torch.uint32, device="cuda")
    epochs = torch.full((world,), 4, dtype=torch.uint32, device="cuda")
    side = torch.cuda.Stream()
    status = new_status("cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for step in range(1, world):
            c = (rank + step) % world
            a_full[starts[c] : starts[c + 1]].copy_(src[starts[c] : starts[c + 1]])
            flags[c : c + 1].copy_(epochs[c : c + 1])
    out = ag_matmul(a_full, b, sizes, rank, flags, 4, status=status, check=False, path=path)
    torch.cuda.synchronize()
    check_status(status, rank, "ag_matmul")
    assert not out.isnan().any()
    assert _rel(out, src @ b) < 1e-2


@gpu
def test_ag_matmul_gpu_timeout():
    a, b = randn(256, 64, dtype=torch.bfloat16, device="cuda"), randn(64, 64, dtype=torch.bfloat16, device="cuda")
    flags = torch.tensor([1, 0], dtype=torch.uint32, device="cuda")
    with pytest.raises(TimeoutError, match="rank 0 timed out waiting for chunk 1"):
        ag_matmul(a, b, split_rows(256, 2), 0, flags, expected=1, timeout_s=0.001)


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
