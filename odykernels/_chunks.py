"""Row chunks of a sequence split over ranks, and the M-tile table the fused kernels walk.

Chunk ``c`` is rows ``[starts[c], starts[c+1])`` and belongs to rank ``c``. The fused kernels tile each
chunk on its own, so no M-tile straddles two chunks and each tile depends on exactly one rank's data.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from odykernels._tiles import grouped_tile

# Columns of one row of the M-tile table, int32 [num_mtiles, TABLE_COLS]; constexpr so kernels can use them.
ROW_START = tl.constexpr(0)
ROW_END = tl.constexpr(1)
CHUNK = tl.constexpr(2)
CHUNK_START = tl.constexpr(3)
CHUNK_MTILES = tl.constexpr(4)
TABLE_COLS = tl.constexpr(5)


@triton.jit
def chunk_tile(tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M: tl.constexpr):
    """Output tile ``tile`` of a fused kernel (grouped order over the table's M-tiles, see ``grouped_tile``):
    ``(row_start, row_end, chunk, chunk_start, chunk_mtiles, pid_n)``, its M-tile's table row and its N-tile.

    Compiled, the loads of columns a caller does not use are dead code and disappear.
    """
    mtile, pid_n = grouped_tile(tile, num_mtiles, num_pid_n, GROUP_M)
    entry = mtiles_ptr + mtile * TABLE_COLS
    return (
        tl.load(entry + ROW_START), tl.load(entry + ROW_END), tl.load(entry + CHUNK), tl.load(entry + CHUNK_START),
        tl.load(entry + CHUNK_MTILES), pid_n,
    )  # fmt: skip


@triton.jit
def chunk_rows(row_start, row_end, BLOCK_M: tl.constexpr):
    """Pointer path: the rows an M-tile loads, ``[BLOCK_M]``; the tail of a chunk's last M-tile wraps onto
    the chunk's own rows, never the next chunk's (whose rows may still be landing)."""
    return row_start + tl.arange(0, BLOCK_M) % (row_end - row_start)


def split_rows(total: int, world: int) -> list[int]:
    """Chunk sizes of ``total = q*world + r`` rows: the first ``r`` ranks get ``q+1``, the rest ``q``."""
    if world <= 0:
        raise ValueError(f"world size must be positive, got {world}")
    if total < 0:
        raise ValueError(f"cannot split a negative row count {total}")
    q, r = divmod(total, world)
    return [q + 1 if i < r else q for i in range(world)]


def chunk_starts(chunk_sizes: list[int]) -> list[int]:
    """Prefix sums: ``chunk_starts([3, 2])`` is ``[0, 3, 5]``."""
    starts = [0]
    for size in chunk_sizes:
        starts.append(starts[-1] + size)
    return starts


def check_chunks(chunk_sizes: list[int], rank: int, rows: int, what: str) -> None:
    """Raise ``ValueError`` unless ``chunk_sizes`` are non-negative, sum to ``rows`` and ``rank`` indexes them."""
    world = len(chunk_sizes)
    if world == 0:
        raise ValueError(f"{what}: chunk_sizes is empty; expected one size per rank")
    if any(int(s) < 0 for s in chunk_sizes):
        raise ValueError(f"{what}: chunk_sizes {list(chunk_sizes)} has a negative size")
    if sum(chunk_sizes) != rows:
        raise ValueError(f"{what}: chunk_sizes {list(chunk_sizes)} sum to {sum(chunk_sizes)}, expected {rows} rows")
    if not 0 <= rank < world:
        raise ValueError(f"{what}: rank {rank} out of range for world size {world}")


@functools.lru_cache(maxsize=256)
def _table(chunk_sizes: tuple[int, ...], first: int, block_m: int, device: torch.device) -> torch.Tensor:
    world = len(chunk_sizes)
    starts = chunk_starts(list(chunk_sizes))
    rows = []
    for step in range(world):
        c = (first + step) % world
        n_mtiles = -(-chunk_sizes[c] // block_m)
        for t in range(n_mtiles):
            row_start = starts[c] + t * block_m
            rows.append([row_start, min(row_start + block_m, starts[c + 1]), c, starts[c], n_mtiles])
    table = torch.tensor(rows, dtype=torch.int32).reshape(-1, TABLE_COLS.value)
    return table.to(device)


def mtile_table(chunk_sizes: list[int], first: int, block_m: int, device: torch.device) -> torch.Tensor:
    """int32 ``[num_mtiles, TABLE_COLS]``: the M-tiles of every chunk, chunks in the order first, first+1, ...

    Row ``t`` holds (row_start, row_end, chunk, chunk's first row, chunk's M-tile count); row_end is
    clipped to the chunk. Cached per arguments (never mutated), so steady-state calls do no host copy.
    """
    return _table(tuple(int(s) for s in chunk_sizes), int(first), int(block_m), device)
