"""All-gather x GEMM, consumer side: multiply the gathered A by this rank's B while chunks still land.

``a_full`` [M, K] is filled by an all-gather that runs concurrently (another stream, copy engines, or
peers writing into this rank's symmetric buffer). Chunk ``c`` (rows ``[starts[c], starts[c+1])``, rank
``c``'s shard) is ready once ``flags[c] == expected``. Programs take M-tiles in rank-rotated order: the
local chunk first (already in place, no wait), then rank+1, rank+2, ... so the first chunks to arrive
(neighbours) are consumed first. Every chunk is tiled on its own, so each tile waits on exactly one flag,
before it loads any of that chunk's rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from odykernels._chunks import CHUNK, ROW_END, ROW_START, TABLE_COLS, check_chunks, mtile_table
from odykernels._runtime import Launch, is_interpreted, normalize_device, num_programs
from odykernels.matmul import (
    check_operands,
    check_out,
    config_for,
    grouped_tile,
    input_precision,
    store_tile,
    tile_dot,
    wrapped_cols,
)
from odykernels.signal import (
    DEFAULT_TIMEOUT_S,
    check_epoch,
    check_flags_tensor,
    check_status,
    check_status_tensor,
    new_status,
    wait_budget,
    wait_flag,
)


@triton.jit(do_not_specialize=["rank", "expected", "budget"])
def _ag_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    flags_ptr,
    status_ptr,
    mtiles_ptr,
    num_mtiles,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    rank,
    expected,
    budget,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_CLOCK: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_mtiles * num_pid_n, tl.num_programs(0)):
        mtile, pid_n = grouped_tile(tile, num_mtiles, num_pid_n, GROUP_M)
        row_start = tl.load(mtiles_ptr + mtile * TABLE_COLS + ROW_START)
        row_end = tl.load(mtiles_ptr + mtile * TABLE_COLS + ROW_END)
        chunk = tl.load(mtiles_ptr + mtile * TABLE_COLS + CHUNK)
        if chunk != rank:
            wait_flag(flags_ptr + chunk, expected, budget, status_ptr, chunk, tile, USE_CLOCK)
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # The tail of a chunk's last M-tile wraps onto the chunk's own rows: never the next chunk's.
        in_chunk = row_start + tl.arange(0, BLOCK_M) % (row_end - row_start)
        acc = tile_dot(
            a_ptr, b_ptr, in_chunk, wrapped_cols(pid_n, N, BLOCK_N), K, stride_am, stride_ak, stride_bk, stride_bn,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION,
        )  # fmt: skip
        store_tile(c_ptr, acc, rows, cols, row_end, N, stride_cm, stride_cn)


def prepare_ag_matmul(
    a_full: torch.Tensor,
    b: torch.Tensor,
    chunk_sizes: list[int],
    rank: int,
    flags: torch.Tensor,
    expected: int,
    out: torch.Tensor | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    status: torch.Tensor | None = None,
    max_programs: int | None = None,
) -> Launch:
    """Check the arguments of :func:`ag_matmul` and configure its launch (run it with ``.run()``).

    ``status`` is required here: the caller checks it when it chooses. The launch's ``out`` is the output
    tensor, already zero-filled when ``K == 0``.
    """
    what = "ag_matmul"
    check_operands(a_full, b, what)
    M, K = a_full.shape
    N = b.shape[1]
    device = a_full.device
    check_chunks(chunk_sizes, rank, M, what)
    check_flags_tensor(flags, len(chunk_sizes), device, what)
    check_epoch(expected, what, "expected")
    interpreted = is_interpreted(_ag_matmul_kernel, device)
    budget = wait_budget(timeout_s, interpreted, what)
    if status is None:
        raise ValueError(f"{what}: a status tensor is required to record timeouts in")
    check_status_tensor(status, device, what)
    if out is None:
        out = torch.empty((M, N), dtype=a_full.dtype, device=device)
    else:
        check_out(out, (M, N), device, what)
    if M == 0 or N == 0:
        return Launch(None, device, out=out)
    if K == 0:
        return Launch(None, device, out=out.zero_())

    cfg = config_for(M, N, K, a_full.dtype, device, _ag_matmul_kernel)
    table = mtile_table(chunk_sizes, rank, cfg.block_m, normalize_device(device))
    num_mtiles = table.shape[0]
    tiles = num_mtiles * triton.cdiv(N, cfg.block_n)
    progs = num_programs(normalize_device(device), tiles, interpreted, max_programs)
    args = (
        a_full, b, out, flags, status, table, num_mtiles, N, K,
        a_full.stride(0), a_full.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        rank, expected, budget,
    )  # fmt: skip
    kwargs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=K % cfg.block_k == 0, INPUT_PRECISION=input_precision(a_full.dtype), USE_CLOCK=not interpreted,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return Launch(_ag_matmul_kernel, device, (progs,), args, kwargs, out)


def ag_matmul(
    a_full: torch.Tensor,
    b: torch.Tensor,
    chunk_sizes: list[int],
    rank: int,
    flags: torch.Tensor,
    expected: int,
    out: torch.Tensor | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    status: torch.Tensor | None = None,
    check: bool = True,
    max_programs: int | None = None,
) -> torch.Tensor:
    """``a_full @ b``, each chunk of ``a_full``'s rows read only after its flag says it has landed.

    Args:
        a_full: (M, K) gathered input, any strides. Rows ``[starts[c], starts[c+1])`` are chunk ``c``,
            written by rank ``c`` (``starts`` = prefix sums of ``chunk_sizes``). This rank's own chunk
            must already be in place (stream order); the others may still be arriving.
        b: (K, N) this rank's weight slice, same dtype and device as ``a_full``.
        chunk_sizes: rows per rank, ``len == world``, summing to M; uneven sizes (and zeros) allowed.
        rank: this rank, in ``[0, world)``.
        flags: contiguous uint32 (world,) on the same device; ``flags[c] == expected`` means chunk ``c`` is
            complete and visible (the producer stores the chunk, then writes ``expected`` with release
            semantics, e.g. ``stream_write_value32`` after a copy). ``flags[rank]`` is never read.
        expected: the epoch of this call, >= 1. Flags start at 0 and are never reset: the caller bumps the
            epoch every call, and the all-gather writes the new epoch into each chunk's flag.
        out: optional (M, N) output, any supported dtype (default ``a_full``'s).
        timeout_s: bound on one wait: GPU time on a GPU, a poll budget under the interpreter
            (:func:`odykernels.signal.wait_budget`).
        status: optional int32 (4,) record (see :mod:`odykernels.signal`), zero on entry; a fresh one by
            default. Pass one to check several launches at once.
        check: synchronize after the launch and raise ``TimeoutError`` (naming rank, chunk and flag values)
            if a wait gave up. With ``check=False`` nothing synchronizes; then ``status`` is required, and
            the caller checks it later with :func:`odykernels.signal.check_status`.
        max_programs: cap on the persistent grid (default: one program per SM). Each program holds most of
            an SM's registers, so a kernel that must run on this GPU while this one waits (a local copy
            kernel feeding the flags, say) needs SMs left free for it; the waits are bounded either way.

    Returns:
        (M, N) tensor ``out``. After a timeout its tiles of the late chunk hold garbage.
    """
    if status is None:
        if not check:
            raise ValueError("ag_matmul: check=False needs a status tensor to record timeouts in")
        status = new_status(a_full.device)
    launch = prepare_ag_matmul(a_full, b, chunk_sizes, rank, flags, expected, out, timeout_s, status, max_programs)
    out = launch.run()
    if check:
        check_status(status, rank, "ag_matmul", index_name="chunk")
    return out
