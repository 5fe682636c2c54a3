"""The ``@triton.jit`` tile helpers the GEMM kernels share (matmul, ag_matmul, matmul_rs; Triton inlines them).

* the persistent schedule: :func:`grouped_tile` (grouped tile order), :func:`flat_loop_bounds` (the TMA
  kernels' flattened loop over tiles x K steps), :func:`tile_offsets` (a tile's rows and columns);
* the pointer path: :func:`tile_dot` (one tile's K loop, ``cp.async`` loads) and :func:`wrapped_cols`;
* the TMA path: :func:`load_a`, :func:`load_b` (descriptor loads in either operand layout) and
  :func:`tma_dot_step` (one K step);
* the epilogue: :func:`store_tile` (masked, 128-bit when the launcher vouches for the alignment).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of linear ``tile`` when ``GROUP_M`` M-tiles at a time sweep all N-tiles."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_m
    pid_n = (tile % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def flat_loop_bounds(pid, progs, num_pid_m, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """TMA path: ``(num_pid_n, k_tiles, my_tiles)`` of the flattened loop of program ``pid`` of ``progs``
    over its tiles ``pid, pid + progs, ...`` of the ``num_pid_m`` x ``num_pid_n`` grid, ``k_tiles`` K steps
    each: ``my_tiles * k_tiles`` iterations.

    The kernels start the loop at ``tile = pid - progs``, ``ki = -1``, and at the top of each iteration
    advance ``ki`` (wrapping at ``k_tiles``) and, when it wraps to 0, ``tile`` by ``progs``.
    """
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    my_tiles = tl.cdiv(num_pid_m * num_pid_n - pid, progs)
    return num_pid_n, k_tiles, my_tiles


@triton.jit
def tile_offsets(row, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(rows, cols)``, ``[BLOCK_M]`` and ``[BLOCK_N]``: the output rows from ``row`` on and the columns of N-tile
    ``pid_n`` (those past the ends included: loads wrap or zero-fill them, stores mask them)."""
    return row + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def tile_dot(
    a_ptr,
    b_ptr,
    rows,
    cols,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Pointer path: fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``A[rows, :K] @ B[:K, cols]``.

    ``rows`` (``[BLOCK_M]``) and ``cols`` (``[BLOCK_N]``) must all be valid indices: callers wrap the tail
    of a partial tile back onto valid rows/columns (and drop those results on store), so only the K tail
    needs a mask and the loads stay unmasked, vectorized and pipelined.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    # int64 steps: a column-major operand has a K stride of M rows, times BLOCK_K may pass 2**31.
    a_step = tl.full([], BLOCK_K, tl.int64) * stride_ak
    b_step = tl.full([], BLOCK_K, tl.int64) * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def wrapped_cols(pid_n, N, BLOCK_N: tl.constexpr):
    """Columns of N-tile ``pid_n`` (``[BLOCK_N]``), those past ``N`` wrapped onto valid ones for loading.

    ``% N`` rather than a clamp: the compiler derives contiguity from N's divisibility through a
    remainder (not through a minimum), which keeps B's loads vectorized and asynchronous.
    """
    return (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N


@triton.jit
def load_a(a_desc, row, k, A_COL_MAJOR: tl.constexpr):
    """TMA path: the ``[BLOCK_M, BLOCK_K]`` block of A at (row, k); rows or columns past A's end read zero.

    ``A_COL_MAJOR``: the descriptor is over Aᵀ (``[K, M]``, M contiguous) and the block is transposed back;
    wgmma reads 16-bit operands from shared memory in either major order.
    """
    if A_COL_MAJOR:
        return a_desc.load([k, row]).T
    else:
        return a_desc.load([row, k])


@triton.jit
def load_b(b_desc, k, col, B_K_CONTIGUOUS: tl.constexpr):
    """TMA path: the ``[BLOCK_K, BLOCK_N]`` block of B at (k, col), zero past B's end.

    ``B_K_CONTIGUOUS``: B is a transposed row-major matrix (``weight.t()`` of an ``nn.Linear``, the usual
    case); the descriptor is over Bᵀ (``[N, K]``) and the block is transposed back.
    """
    if B_K_CONTIGUOUS:
        return b_desc.load([col, k]).T
    else:
        return b_desc.load([k, col])


@triton.jit
def tma_dot_step(
    acc, a_desc, b_desc, row, ki, pid_n,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_COL_MAJOR: tl.constexpr, B_K_CONTIGUOUS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """TMA path, K step ``ki`` of the tile whose rows start at ``row`` and whose N-tile is ``pid_n``: ``acc``
    plus the product of the A block and the B block of that step."""
    a = load_a(a_desc, row, ki * BLOCK_K, A_COL_MAJOR)
    b = load_b(b_desc, ki * BLOCK_K, pid_n * BLOCK_N, B_K_CONTIGUOUS)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def store_tile(c_ptr, acc, rows, cols, row_end, col_end, stride_cm, stride_cn, VEC: tl.constexpr = 1):
    """Store ``acc`` to ``C[rows, cols]`` in C's dtype, skipping rows ``>= row_end`` and cols ``>= col_end``.

    ``VEC > 1`` promises (the host checked it) that ``stride_cm`` and ``col_end`` are multiples of ``VEC``
    elements, ``VEC`` elements are 16 bytes, C's address is 16-byte aligned and ``stride_cn == 1``: the
    compiler then emits 128-bit stores even when the JIT could not prove it (a stride that is a multiple of
    8 but not 16 elements, a loaded peer offset).
    """
    if VEC > 1:
        stride_cm = tl.multiple_of(stride_cm, VEC)
        col_end = tl.multiple_of(col_end, VEC)
    mask = (rows[:, None] < row_end) & (cols[None, :] < col_end)
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
