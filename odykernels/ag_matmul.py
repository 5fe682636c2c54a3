"""All-gather x GEMM, consumer side: multiply the gathered A by this rank's B while chunks still land.

``a_full`` [M, K] is filled by an all-gather that runs concurrently (another stream, copy engines, or
peers writing into this rank's symmetric buffer). Chunk ``c`` (rows ``[starts[c], starts[c+1])``, rank
``c``'s shard) is ready once ``flags[c] == expected``. Programs take M-tiles in rank-rotated order: the
local chunk first (already in place, no wait), then rank+1, rank+2, ... so the first chunks to arrive
(neighbours) are consumed first. Every chunk is tiled on its own, so each tile waits on exactly one flag,
before it loads any of that chunk's rows.

On the TMA path (sm_90) the loop over (tile, K step) is flattened and software-pipelined, so the loads of a
tile are issued up to ``num_stages - 1`` iterations before the loop body that computes it; a wait placed at
the tile would come after its own loads. Each program therefore acquires a tile's flag ``LOOKAHEAD`` (=
``num_stages``) iterations ahead of the tile's first K step, and before the loop for the tiles whose loads
the pipeline's prologue issues; a bitmask remembers the chunks already acquired, so a program waits at most
once per chunk. ``tests/test_kernels_compile.py`` checks in the compiled code that the prologue is shallower than
the lookahead (:func:`lookahead`, which the launcher and ``_compile`` share). Under the interpreter the kernel
issues its loads ``num_stages - 1`` iterations early itself (:func:`prefetch_step`), so a window too short
reads stale rows on the CPU too.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from odykernels._chunks import check_chunks, chunk_rows, chunk_tile, mtile_table
from odykernels._runtime import Launch, is_interpreted, normalize_device, run_checked
from odykernels._tiles import (
    flat_loop_bounds,
    load_a,
    load_b,
    store_tile,
    tile_dot,
    tile_offsets,
    tma_dot_step,
    wrapped_cols,
)
from odykernels.matmul import TileConfig, check_operands, gemm_launch_metadata, out_tensor, out_vec, plan_gemm
from odykernels.signal import DEFAULT_TIMEOUT_S, check_status, check_waits, new_status, wait_flag, wait_flag_for_tma


@triton.jit(
    do_not_specialize=["rank", "expected", "budget"], launch_metadata=gemm_launch_metadata("ag_matmul", "pointer")
)
def _ag_matmul_kernel(
    a_ptr, b_ptr, c_ptr, flags_ptr, status_ptr, mtiles_ptr,
    num_mtiles, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    rank, expected, budget,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, OUT_VEC: tl.constexpr, USE_CLOCK: tl.constexpr,
):  # fmt: skip
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_mtiles * num_pid_n, tl.num_programs(0)):
        row_start, row_end, chunk, _, _, pid_n = chunk_tile(tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M)
        if chunk != rank:
            wait_flag(flags_ptr + chunk, expected, budget, status_ptr, chunk, tile, USE_CLOCK)
        rows, cols = tile_offsets(row_start, pid_n, BLOCK_M, BLOCK_N)
        acc = tile_dot(
            a_ptr, b_ptr, chunk_rows(row_start, row_end, BLOCK_M), wrapped_cols(pid_n, N, BLOCK_N), K,
            stride_am, stride_ak, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION,
        )  # fmt: skip
        store_tile(c_ptr, acc, rows, cols, row_end, N, stride_cm, stride_cn, OUT_VEC)


@triton.jit
def acquire_tile_chunk(
    tile, ready, num_mtiles, num_pid_n, mtiles_ptr, flags_ptr, status_ptr, rank, expected, budget,
    GROUP_M: tl.constexpr, USE_CLOCK: tl.constexpr,
):  # fmt: skip
    """Acquire the flag of the chunk output tile ``tile`` reads, unless it is local or already in ``ready``.

    ``ready`` is an int64 bitmask of the chunks this program has acquired; chunks 63 and up are never
    recorded (and so waited on per tile, still correctly). Returns the updated mask.
    """
    _, _, chunk, _, _, _ = chunk_tile(tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M)
    bit = tl.where(chunk < 63, tl.full([], 1, tl.int64) << tl.minimum(chunk, 62).to(tl.int64), 0)
    if (chunk != rank) & ((ready & bit) == 0):
        wait_flag_for_tma(flags_ptr + chunk, expected, budget, status_ptr, chunk, tile, USE_CLOCK)
        ready |= bit
    return ready


@triton.jit
def prefetch_step(
    loads, it, total, pid, progs, k_tiles, num_mtiles, num_pid_n, mtiles_ptr, a_desc, b_desc,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, A_COL_MAJOR: tl.constexpr,
    B_K_CONTIGUOUS: tl.constexpr,
):  # fmt: skip
    """Interpreter only (``PREFETCH > 0``): load the A and B blocks of flattened iteration ``it`` now and queue
    them in ``loads`` (a Python list: the interpreter runs the kernel as Python) for that iteration to use.

    The compiled pipeline issues an iteration's loads up to ``num_stages - 1`` iterations early; this does the
    same on the CPU, so rows that land between the load and its use are not seen, and a flag acquired too
    late (a ``LOOKAHEAD`` shorter than the pipeline) reads stale rows.
    """
    if it < total:
        ki = it % k_tiles
        row_start, _, _, _, _, pid_n = chunk_tile(pid + (it // k_tiles) * progs, num_mtiles, num_pid_n, mtiles_ptr,
                                                  GROUP_M)  # fmt: skip
        a = load_a(a_desc, row_start, ki * BLOCK_K, A_COL_MAJOR)
        loads.append((a, load_b(b_desc, ki * BLOCK_K, pid_n * BLOCK_N, B_K_CONTIGUOUS)))


@triton.jit(do_not_specialize=["rank", "expected", "budget"], launch_metadata=gemm_launch_metadata("ag_matmul", "tma"))
def _ag_matmul_tma_kernel(
    a_desc, b_desc, c_ptr, flags_ptr, status_ptr, mtiles_ptr,
    num_mtiles, N, K,
    stride_cm, stride_cn,
    rank, expected, budget,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_COL_MAJOR: tl.constexpr, B_K_CONTIGUOUS: tl.constexpr, INPUT_PRECISION: tl.constexpr, OUT_VEC: tl.constexpr,
    LOOKAHEAD: tl.constexpr, USE_CLOCK: tl.constexpr, PREFETCH: tl.constexpr = 0,
):  # fmt: skip
    # The flattened loop of _matmul_tma_kernel over M-tiles of the chunk table, plus the flag waits.
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    num_pid_n, k_tiles, my_tiles = flat_loop_bounds(pid, progs, num_mtiles, N, K, BLOCK_N, BLOCK_K)
    total = my_tiles * k_tiles
    # Iterations [0, LOOKAHEAD) are this program's first tiles; the pipeline prologue may load them before
    # the loop body runs, so their chunks are acquired first. Iteration `it` acquires the tile that starts
    # at iteration it + LOOKAHEAD, in time for the loads the pipeline issues (at most num_stages - 1 ahead).
    ready = tl.zeros([], tl.int64)
    for t in range(0, tl.minimum(my_tiles, (LOOKAHEAD - 1) // k_tiles + 1)):
        ready = acquire_tile_chunk(
            pid + t * progs, ready, num_mtiles, num_pid_n, mtiles_ptr, flags_ptr, status_ptr, rank, expected, budget,
            GROUP_M, USE_CLOCK,
        )  # fmt: skip
    tile, ki, row_start, row_end, pid_n = pid - progs, -1, 0, 0, 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH > 0:  # interpreter: the pipeline's prologue, the loads of iterations [0, PREFETCH)
        loads = []
        for j in range(0, PREFETCH):
            prefetch_step(
                loads, j, total, pid, progs, k_tiles, num_mtiles, num_pid_n, mtiles_ptr, a_desc, b_desc,
                BLOCK_N, BLOCK_K, GROUP_M, A_COL_MAJOR, B_K_CONTIGUOUS,
            )  # fmt: skip
    for it in range(0, total):
        if PREFETCH > 0:  # interpreter: issued before this iteration's acquire, as the pipeline may issue them
            prefetch_step(
                loads, it + PREFETCH, total, pid, progs, k_tiles, num_mtiles, num_pid_n, mtiles_ptr, a_desc, b_desc,
                BLOCK_N, BLOCK_K, GROUP_M, A_COL_MAJOR, B_K_CONTIGUOUS,
            )  # fmt: skip
        ki = tl.where(ki == k_tiles - 1, 0, ki + 1)
        if ki == 0:
            tile += progs
            row_start, row_end, _, _, _, pid_n = chunk_tile(tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M)
        ahead = it + LOOKAHEAD
        if (ahead < total) & (ahead % k_tiles == 0):
            ready = acquire_tile_chunk(
                pid + (ahead // k_tiles) * progs, ready, num_mtiles, num_pid_n, mtiles_ptr, flags_ptr, status_ptr,
                rank, expected, budget, GROUP_M, USE_CLOCK,
            )  # fmt: skip
        # A chunk's partial last tile reads up to BLOCK_M - 1 rows past the chunk (the next chunk's rows,
        # maybe still landing, or zeros past M); those rows only reach output rows the store drops.
        if PREFETCH > 0:
            a, b = loads.pop(0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tma_dot_step(
                acc, a_desc, b_desc, row_start, ki, pid_n, BLOCK_N, BLOCK_K, A_COL_MAJOR, B_K_CONTIGUOUS,
                INPUT_PRECISION,
            )  # fmt: skip
        if ki == k_tiles - 1:
            rows, cols = tile_offsets(row_start, pid_n, BLOCK_M, BLOCK_N)
            store_tile(c_ptr, acc, rows, cols, row_end, N, stride_cm, stride_cn, OUT_VEC)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


def lookahead(cfg: TileConfig) -> int:
    """The TMA kernel's ``LOOKAHEAD`` for ``cfg``: how many iterations before a tile's first K step its chunk's
    flag is acquired. The software pipeline issues a step's loads up to ``num_stages - 1`` iterations early,
    possibly before the acquire of the iteration that issues them, so one more: ``num_stages``. The launcher
    and ``odykernels._compile`` both take it from here."""
    return cfg.num_stages


def prepare_ag_matmul(
    a_full: torch.Tensor,
    b: torch.Tensor,
    chunk_sizes: list[int],
    rank: int,
    flags: torch.Tensor,
    expected: int,
    *,
    out: torch.Tensor | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    status: torch.Tensor | None = None,
    max_programs: int | None = None,
    path: str | None = None,
) -> Launch:
    """The launch of ``a_full @ b``, each chunk of ``a_full``'s rows read only after its flag says it landed.

    Checks the arguments and configures the launch; ``.run()`` runs it, ``.check()`` raises ``TimeoutError``
    (naming rank, chunk and flag values) if a wait gave up. :func:`ag_matmul` does both.

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
            default. Pass one to check several launches at once, later, with
            :func:`odykernels.signal.check_status`.
        max_programs: cap on the persistent grid (default: one program per SM). Each program holds most of
            an SM's registers, so a kernel that must run on this GPU while this one waits (a local copy
            kernel feeding the flags, say) needs SMs left free for it; the waits are bounded either way.
        path: ``"tma"`` or ``"pointer"`` to force a code path (default: TMA on sm_90+ when ``a_full`` and
            ``b`` are 16-byte aligned with a unit stride, see :func:`odykernels.matmul.choose_path`).

    Returns:
        The launch; its ``out`` is the (M, N) output, already zero-filled when ``K == 0``. After a timeout
        the output's tiles of the late chunk hold garbage.
    """
    what = "ag_matmul"
    M, N, K = check_operands(a_full, b, what)
    device = a_full.device
    check_chunks(chunk_sizes, rank, M, what)
    interpreted = is_interpreted(_ag_matmul_kernel, device)
    status = new_status(device) if status is None else status
    budget = check_waits(flags, len(chunk_sizes), expected, timeout_s, status, device, interpreted, what, "expected")
    out = out_tensor(out, (M, N), a_full.dtype, device, what)
    if M == 0 or N == 0:
        return Launch(None, device, out=out)
    if K == 0:
        return Launch(None, device, out=out.zero_())
    verify = functools.partial(check_status, status, rank, what, "chunk")

    plan = plan_gemm(a_full, b, out.dtype, (_ag_matmul_kernel, _ag_matmul_tma_kernel), path, what)
    table = mtile_table(chunk_sizes, rank, plan.cfg.block_m, normalize_device(device))
    num_mtiles = table.shape[0]
    args = (
        *plan.operands, out, flags, status, table, num_mtiles, N, K, *plan.strides, out.stride(0), out.stride(1),
        rank, expected, budget,
    )  # fmt: skip
    tma = {}
    if plan.path == "tma":
        # Under the interpreter the kernel issues its loads num_stages - 1 iterations early itself (prefetch_step).
        tma = {"LOOKAHEAD": lookahead(plan.cfg), "PREFETCH": plan.cfg.num_stages - 1 if interpreted else 0}
    launch = plan.launch(num_mtiles, args, out, max_programs, OUT_VEC=out_vec(out, N), USE_CLOCK=not interpreted, **tma)
    launch.verify = verify
    return launch


def ag_matmul(*args, check: bool = True, **kwargs) -> torch.Tensor:
    """``a_full @ b`` with waits on the chunks' flags: :func:`prepare_ag_matmul`'s launch, run and checked.

    Takes :func:`prepare_ag_matmul`'s arguments, and ``check``: synchronize after the launch and raise
    ``TimeoutError`` (naming rank, chunk and flag values) if a wait gave up. With ``check=False`` nothing
    synchronizes; ``status`` is then required, for the caller to check later. Returns the (M, N) output.
    """
    return run_checked(prepare_ag_matmul, "ag_matmul", args, kwargs, check)
