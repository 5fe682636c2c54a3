"""GEMM x reduce-scatter: each rank's partial product is pushed, chunk by chunk, to the rank that owns it.

Rank ``r`` holds ``A_r`` [M, K_r] (all M rows, its slice of K) and ``B_r`` [K_r, N]; the layer output is
``sum_r A_r @ B_r`` split by rows, chunk ``d`` (rows ``[starts[d], starts[d+1])``) going to rank ``d``.

Producer (:func:`matmul_rs`): programs compute the output tiles of destination chunks in the order
rank+1, rank+2, ..., rank (own chunk last, so peers get their data as early as possible), store each tile
straight into the destination's receive buffer, slot ``r``, and once every tile of that destination is
stored, set the destination's flag ``r`` to the epoch.

Consumer (:func:`reduce_slots`): rank ``d`` sums its ``world`` slots in the fixed order 0..world-1 in fp32,
waiting (bounded) on each source's flag before reading its slot. The order, not arrival, fixes the
rounding, so the result is deterministic.

Signalling granularity: one flag per (destination, source), set once per call when the whole slot is
written. The producer counts finished tiles per destination in ``counters`` (its own memory); the program
that finishes the last tile of a destination resets that counter to 0 and sets the flag. Flags carry the
epoch, so neither flags nor counters need clearing between calls.

Peer addressing: a kernel gets one base pointer (this rank's receive buffer / flags) plus int64 element
offsets ``peer_offsets[j]`` = (peer j's buffer address - base address) / element size, and addresses
peer ``j`` as ``base + peer_offsets[j] + local offset``. With CUDA symmetric memory the offsets come from
the rendezvous handle's ``buffer_ptrs``; in a single-process simulation all buffers are slices of one
tensor. Loaded pointers are avoided because the CPU interpreter cannot dereference them.

Alignment rule (checked by the launcher, on every device): the receive buffer's address, its slot and row
strides and every peer offset are multiples of 16 bytes, and its column stride is 1. The kernels state
that with ``tl.multiple_of`` on the loaded offset and the strides, so every peer store is a 128-bit
``st.global.v4`` (a loaded offset has no alignment the compiler could prove: without the hint a tile went
out as 16-bit scalar stores). The padding columns ``[N, round_up(N, 16 bytes))`` of a row belong to the
kernel, which may write them.

On the TMA path (sm_90) the K loop is flattened over the program's tiles like ``matmul``'s; the epilogue
(peer stores, the tile count, the flag) runs in the loop's last pipeline stage while the next tile loads.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from odykernels._chunks import check_chunks, chunk_rows, chunk_tile, mtile_table
from odykernels._runtime import Launch, is_interpreted, normalize_device, run_checked
from odykernels._tiles import flat_loop_bounds, store_tile, tile_dot, tile_offsets, tma_dot_step, wrapped_cols
from odykernels.matmul import check_dtype, check_operands, gemm_launch_metadata, out_tensor, plan_gemm
from odykernels.signal import (
    DEFAULT_TIMEOUT_S,
    check_epoch,
    check_flags_tensor,
    check_status,
    check_vector,
    check_waits,
    cta_barrier,
    new_status,
    notify,
    wait_flag,
)

ALIGN_BYTES = 16
"""Alignment of the receive buffer's address, strides and peer offsets (one 128-bit store)."""


@triton.jit
def store_slot(
    recv_ptr, recv_offsets_ptr, dest, rank, acc, rows, cols, row_end, N, stride_rs, stride_rm, stride_rn,
    VEC: tl.constexpr,
):  # fmt: skip
    """Store ``acc`` (rows relative to the destination's chunk) into slot ``rank`` of ``dest``'s buffer.

    ``VEC`` elements are 16 bytes; the launcher checked that the peer offsets and the slot and row strides
    are multiples of it, so the stores are 128-bit. Columns up to N rounded up to ``VEC`` are written
    (row padding, the kernel's by the alignment rule), which keeps the column mask ``VEC``-aligned.
    """
    offset = tl.multiple_of(tl.load(recv_offsets_ptr + dest), VEC)
    slot_ptr = recv_ptr + offset + rank.to(tl.int64) * tl.multiple_of(stride_rs, VEC)
    store_tile(slot_ptr, acc, rows, cols, row_end, tl.cdiv(N, VEC) * VEC, stride_rm, stride_rn, VEC)


@triton.jit
def count_tile(counters_ptr, flags_ptr, flag_offsets_ptr, dest, rank, epoch, dest_tiles, USE_ASM: tl.constexpr):
    """Count one finished tile for ``dest``; the program that counts its last tile raises ``dest``'s flag.

    The barrier first orders every thread's stores of this tile before the acquire-release count (system
    scope: they went to a peer). The program that counts the last tile has acquired every other program's
    count, so its release publishes their tiles too. Nobody touches the counter again this call, so it is
    reset for the next one.
    """
    cta_barrier(USE_ASM)
    done = tl.atomic_add(counters_ptr + dest, 1, sem="acq_rel", scope="sys")
    if done == dest_tiles - 1:
        tl.atomic_xchg(counters_ptr + dest, 0, sem="relaxed", scope="gpu")
        notify(flags_ptr + tl.load(flag_offsets_ptr + dest) + rank, epoch, USE_ASM)


@triton.jit(do_not_specialize=["rank", "epoch"], launch_metadata=gemm_launch_metadata("matmul_rs", "pointer"))
def _matmul_rs_kernel(
    a_ptr, b_ptr, recv_ptr, recv_offsets_ptr, flags_ptr, flag_offsets_ptr, counters_ptr, mtiles_ptr,
    num_mtiles, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_rs, stride_rm, stride_rn,
    rank, epoch,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, RECV_VEC: tl.constexpr,
):  # fmt: skip
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_mtiles * num_pid_n, tl.num_programs(0)):
        row_start, row_end, dest, dest_start, dest_mtiles, pid_n = chunk_tile(
            tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M
        )
        rows, cols = tile_offsets(row_start, pid_n, BLOCK_M, BLOCK_N)
        acc = tile_dot(
            a_ptr, b_ptr, chunk_rows(row_start, row_end, BLOCK_M), wrapped_cols(pid_n, N, BLOCK_N), K,
            stride_am, stride_ak, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION,
        )  # fmt: skip
        store_slot(
            recv_ptr, recv_offsets_ptr, dest, rank, acc, rows - dest_start, cols, row_end - dest_start, N,
            stride_rs, stride_rm, stride_rn, RECV_VEC,
        )  # fmt: skip
        count_tile(counters_ptr, flags_ptr, flag_offsets_ptr, dest, rank, epoch, dest_mtiles * num_pid_n, False)


@triton.jit(do_not_specialize=["rank", "epoch"], launch_metadata=gemm_launch_metadata("matmul_rs", "tma"))
def _matmul_rs_tma_kernel(
    a_desc, b_desc, recv_ptr, recv_offsets_ptr, flags_ptr, flag_offsets_ptr, counters_ptr, mtiles_ptr,
    num_mtiles, N, K,
    stride_rs, stride_rm, stride_rn,
    rank, epoch,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_COL_MAJOR: tl.constexpr, B_K_CONTIGUOUS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    RECV_VEC: tl.constexpr, USE_ASM: tl.constexpr,
):  # fmt: skip
    # The flattened loop of _matmul_tma_kernel over M-tiles of the chunk table; A and B are local, so
    # nothing waits. USE_ASM (compiled for a GPU): the epilogue's barriers are inline PTX, which the
    # pipeliner accepts (a tl.debug_barrier in the loop body leaves it unpipelined).
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    num_pid_n, k_tiles, my_tiles = flat_loop_bounds(pid, progs, num_mtiles, N, K, BLOCK_N, BLOCK_K)
    tile, ki, row_start, row_end, dest, dest_start, dest_mtiles, pid_n = pid - progs, -1, 0, 0, 0, 0, 0, 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, my_tiles * k_tiles):
        ki = tl.where(ki == k_tiles - 1, 0, ki + 1)
        if ki == 0:
            tile += progs
            row_start, row_end, dest, dest_start, dest_mtiles, pid_n = chunk_tile(
                tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M
            )
        # A partial last tile of a chunk reads the next chunk's rows of A (local, complete) or zeros past M;
        # those rows reach only output rows the store drops.
        acc = tma_dot_step(
            acc, a_desc, b_desc, row_start, ki, pid_n, BLOCK_N, BLOCK_K, A_COL_MAJOR, B_K_CONTIGUOUS, INPUT_PRECISION
        )
        if ki == k_tiles - 1:
            rows, cols = tile_offsets(row_start, pid_n, BLOCK_M, BLOCK_N)
            store_slot(
                recv_ptr, recv_offsets_ptr, dest, rank, acc, rows - dest_start, cols, row_end - dest_start, N,
                stride_rs, stride_rm, stride_rn, RECV_VEC,
            )  # fmt: skip
            count_tile(counters_ptr, flags_ptr, flag_offsets_ptr, dest, rank, epoch, dest_mtiles * num_pid_n, USE_ASM)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


def _reduce_metadata(grid, kernel, args) -> dict:
    """``launch_metadata`` of reduce_slots: world - 1 additions per output element; reads every slot once."""
    out = args["out_ptr"]
    rows, N, world = out.shape[0], out.shape[1], args["world"]
    return {
        "name": f"odykernels.reduce_slots world={world} rows={rows} N={N}",
        "flops": float(max(world - 1, 0) * rows * N),
        "bytes": world * rows * N * args["recv_ptr"].element_size() + rows * N * out.element_size(),
    }


@triton.jit(do_not_specialize=["epoch", "budget"], launch_metadata=_reduce_metadata)
def _reduce_slots_kernel(
    recv_ptr,
    flags_ptr,
    out_ptr,
    status_ptr,
    rows,
    N,
    world,
    stride_rs,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    epoch,
    budget,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_CLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tile = pid_m * tl.num_programs(1) + pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < N)
    slot_ptrs = recv_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n.to(tl.int64)[None, :] * stride_rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for src in range(0, world):
        wait_flag(flags_ptr + src, epoch, budget, status_ptr, src, tile, USE_CLOCK)
        part = tl.load(slot_ptrs, mask=mask, other=0.0)
        acc += part.to(tl.float32)
        # Pointer steps stay 64-bit: slot ``src`` starts src * stride_rs elements in, possibly past 2**31.
        slot_ptrs += stride_rs
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Elementwise and memory-bound: 64x128 tiles give 16-byte row accesses for 16-bit data with 4 warps
# (a common choice for such kernels, not timed here). The interpreter runs a few large programs faster.
REDUCE_BLOCK = (64, 128)
REDUCE_NUM_WARPS = 4
REDUCE_BLOCK_INTERPRETER = (32, 32)


def _check_recv(recv: torch.Tensor, world: int, max_rows: int, N: int, device: torch.device, what: str) -> None:
    if recv.dim() != 3 or recv.shape[0] != world or recv.shape[1] < max_rows or recv.shape[2] != N:
        raise ValueError(
            f"{what}: recv has shape {list(recv.shape)}, expected [{world}, >= {max_rows}, {N}] "
            f"(source slot, rows of the largest chunk, N)"
        )
    if recv.device != device:
        raise ValueError(f"{what}: recv is on {recv.device}, expected {device}")
    check_dtype(recv.dtype, device, f"{what}: recv")


# peer_offsets tensors whose values passed the alignment check: id -> (weak reference, version, element size).
# Reading the offsets is a device-to-host copy; the symmetric-memory backend keeps one offsets tensor per
# buffer, so the check costs that copy once per tensor (and again after an in-place change).
_ALIGNED_OFFSETS: dict[int, tuple[weakref.ref, int, int]] = {}


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: check every time
        return None


def check_recv_alignment(recv: torch.Tensor, peer_offsets: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` unless ``recv`` and ``peer_offsets`` follow the 16-byte rule (module docstring).

    The first check of a ``peer_offsets`` tensor reads it to the host (a synchronization; do it before a
    CUDA graph capture, like the first call for a chunk layout); later calls reuse the verdict until the
    tensor changes.
    """
    es = recv.element_size()
    if recv.stride(2) != 1:
        raise ValueError(f"{what}: recv has strides {tuple(recv.stride())}; expected a column stride of 1")
    if recv.data_ptr() % ALIGN_BYTES:
        raise ValueError(
            f"{what}: recv starts at address {recv.data_ptr():#x}, {recv.data_ptr() % ALIGN_BYTES} bytes past a "
            f"{ALIGN_BYTES}-byte boundary; expected {ALIGN_BYTES}-byte alignment"
        )
    for dim, name in ((1, "row"), (0, "slot")):
        if (recv.stride(dim) * es) % ALIGN_BYTES:
            raise ValueError(
                f"{what}: recv's {name} stride is {recv.stride(dim)} elements = {recv.stride(dim) * es} bytes, "
                f"expected a multiple of {ALIGN_BYTES} bytes (pad the row length N and max_rows so that rows and "
                f"slots start on {ALIGN_BYTES}-byte boundaries)"
            )
    key = id(peer_offsets)
    seen = _ALIGNED_OFFSETS.get(key)
    version = _version(peer_offsets)
    if seen is not None and seen[0]() is peer_offsets and version is not None and seen[1:] == (version, es):
        return
    for j, offset in enumerate(peer_offsets.tolist()):
        if (offset * es) % ALIGN_BYTES:
            raise ValueError(
                f"{what}: peer_offsets[{j}] = {offset} elements = {offset * es} bytes, expected a multiple of "
                f"{ALIGN_BYTES} bytes (every peer's recv must start on a {ALIGN_BYTES}-byte boundary)"
            )
    if version is not None:
        if len(_ALIGNED_OFFSETS) > 1024:
            _ALIGNED_OFFSETS.clear()
        _ALIGNED_OFFSETS[key] = (weakref.ref(peer_offsets), version, es)


def prepare_matmul_rs(
    a: torch.Tensor,
    b: torch.Tensor,
    chunk_sizes: list[int],
    rank: int,
    recv: torch.Tensor,
    peer_offsets: torch.Tensor,
    flags: torch.Tensor,
    flag_peer_offsets: torch.Tensor,
    epoch: int,
    *,
    counters: torch.Tensor | None = None,
    max_programs: int | None = None,
    path: str | None = None,
) -> Launch:
    """The launch (``.run()``) that computes ``a @ b`` and pushes each destination chunk's rows into that
    rank's receive buffer, slot ``rank``.

    Layouts (identical on every rank, as symmetric memory requires):

    * receive buffer ``recv``: (world, max_rows, N), ``recv[s, i, :]`` = row ``starts[d] + i`` of source
      ``s``'s partial product on destination rank ``d``; ``max_rows >= max(chunk_sizes)``; any float dtype
      the kernels support (fp32 keeps partials exact before the sum; 16-bit halves the traffic).
      **16-byte rule** (checked, ``ValueError`` otherwise): ``recv``'s address, ``recv.stride(0)`` and
      ``recv.stride(1)`` times the element size, and every ``peer_offsets[j]`` times the element size are
      multiples of 16 bytes; ``recv.stride(2) == 1``. E.g. allocate (world, max_rows, N_pad) with
      N_pad = N rounded up to 16 bytes and view ``[..., :N]``. The kernel may write the padding columns.
    * flags: contiguous uint32 (world,), ``flags[s]`` on rank ``d`` = epoch of the last call whose slot
      ``s`` is complete on ``d``. Start at 0; never reset.

    Args:
        a: (M, K_r) this rank's activations over the full sequence, its slice of K.
        b: (K_r, N) this rank's weight rows; same dtype/device as ``a``.
        chunk_sizes: output rows per destination rank, ``len == world``, summing to M.
        rank: this rank.
        recv: this rank's receive buffer (the base every peer address is relative to), contiguous in the
            sense that every peer's buffer has the same strides.
        peer_offsets: int64 (world,), ``(address of peer j's recv - recv.data_ptr()) // recv.element_size()``;
            ``peer_offsets[rank] == 0``. May be negative.
        flags: this rank's uint32 (world,) flags (base for ``flag_peer_offsets``).
        flag_peer_offsets: int64 (world,), the same for the flags, in uint32 elements.
        epoch: this call's number, >= 1, the value written into the destinations' flags.
        counters: optional int32 (world,) zeroed scratch on this device; the kernel leaves it zeroed, so
            it can be kept across calls (not shared by two launches in flight). Allocated if None.
        max_programs: cap on the persistent grid (default: one program per SM), to leave SMs to kernels
            that run beside this one (e.g. the peers' reductions or other communication).
        path: ``"tma"`` or ``"pointer"`` to force a code path for the loads (default: TMA on sm_90+ when
            ``a`` and ``b`` are 16-byte aligned with a unit stride and K_r > 0).

    The launch writes the peers' receive buffers and flags and returns nothing. It never waits, so it
    cannot time out.
    With K_r == 0 the partial is zero and is still sent, so the peers' reductions complete.
    """
    what = "matmul_rs"
    M, N, K = check_operands(a, b, what)
    device = a.device
    check_chunks(chunk_sizes, rank, M, what)
    world = len(chunk_sizes)
    _check_recv(recv, world, max(chunk_sizes), N, device, what)
    check_vector(peer_offsets, torch.int64, world, device, what, "peer_offsets")
    check_recv_alignment(recv, peer_offsets, what)
    check_flags_tensor(flags, world, device, what)
    check_vector(flag_peer_offsets, torch.int64, world, device, what, "flag_peer_offsets")
    check_epoch(epoch, what)
    if counters is None:
        counters = torch.zeros(world, dtype=torch.int32, device=device)
    else:
        check_vector(counters, torch.int32, world, device, what, "counters")
    if M == 0 or N == 0:
        return Launch(None, device)

    plan = plan_gemm(a, b, recv.dtype, (_matmul_rs_kernel, _matmul_rs_tma_kernel), path, what)
    table = mtile_table(chunk_sizes, (rank + 1) % world, plan.cfg.block_m, normalize_device(device))
    num_mtiles = table.shape[0]
    args = (
        *plan.operands, recv, peer_offsets, flags, flag_peer_offsets, counters, table, num_mtiles, N, K,
        *plan.strides, recv.stride(0), recv.stride(1), recv.stride(2), rank, epoch,
    )  # fmt: skip
    use_asm = {"USE_ASM": not plan.interpreted} if plan.path == "tma" else {}
    return plan.launch(
        num_mtiles, args, max_programs=max_programs, RECV_VEC=ALIGN_BYTES // recv.element_size(), **use_asm
    )


def matmul_rs(*args, **kwargs) -> None:
    """Run :func:`prepare_matmul_rs`'s launch (same arguments): ``a @ b`` pushed into the peers' slots."""
    prepare_matmul_rs(*args, **kwargs).run()


def prepare_reduce_slots(
    recv: torch.Tensor,
    flags: torch.Tensor,
    chunk_sizes: list[int],
    rank: int,
    epoch: int,
    *,
    out: torch.Tensor | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    status: torch.Tensor | None = None,
) -> Launch:
    """The launch that sums the ``world`` slots of this rank's receive buffer in source order 0..world-1
    (fp32 accumulate).

    Args:
        recv: (world, max_rows, N) this rank's receive buffer (layout in :func:`matmul_rs`).
        flags: contiguous uint32 (world,) this rank's flags; slot ``s`` is read after ``flags[s] == epoch``.
        chunk_sizes: rows per rank (as given to :func:`matmul_rs`); this rank's output has
            ``chunk_sizes[rank]`` rows.
        rank: this rank.
        epoch: the epoch the producers of this call wrote, >= 1.
        out: optional (chunk_sizes[rank], N) output, any supported dtype (default ``recv``'s).
        timeout_s: bound on one wait (GPU time; a poll budget under the interpreter).
        status: optional int32 (4,) record, zero on entry (see :mod:`odykernels.signal`); a fresh one by
            default.

    Returns:
        The launch (``.run()``, then ``.check()`` raises ``TimeoutError`` naming the rank, the missing
        source and the flag values); its ``out`` is the (chunk_sizes[rank], N) sum.
    """
    what = "reduce_slots"
    device = recv.device
    world = len(chunk_sizes)
    if recv.dim() != 3:
        raise ValueError(f"{what}: recv must be 3-D [world, max_rows, N], got shape {list(recv.shape)}")
    N = recv.shape[2]
    check_chunks(chunk_sizes, rank, sum(chunk_sizes), what)
    _check_recv(recv, world, max(chunk_sizes), N, device, what)
    interpreted = is_interpreted(_reduce_slots_kernel, device)
    status = new_status(device) if status is None else status
    budget = check_waits(flags, world, epoch, timeout_s, status, device, interpreted, what)
    rows = chunk_sizes[rank]
    out = out_tensor(out, (rows, N), recv.dtype, device, what)
    if rows == 0 or N == 0:
        return Launch(None, device, out=out)

    block_m, block_n = REDUCE_BLOCK_INTERPRETER if interpreted else REDUCE_BLOCK
    grid = (triton.cdiv(rows, block_m), triton.cdiv(N, block_n))
    args = (
        recv, flags, out, status, rows, N, world,
        recv.stride(0), recv.stride(1), recv.stride(2), out.stride(0), out.stride(1),
        epoch, budget,
    )  # fmt: skip
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, USE_CLOCK=not interpreted, num_warps=REDUCE_NUM_WARPS)
    verify = functools.partial(check_status, status, rank, what, "source")
    return Launch(_reduce_slots_kernel, device, grid, args, kwargs, out, verify)


def reduce_slots(*args, check: bool = True, **kwargs) -> torch.Tensor:
    """Sum this rank's receive slots in source order: :func:`prepare_reduce_slots`'s launch, run and checked.

    Takes :func:`prepare_reduce_slots`'s arguments, and ``check``: synchronize and raise ``TimeoutError``
    naming the rank, the missing source and the flag values; with ``check=False`` a ``status`` is required
    and nothing synchronizes. Returns the (chunk_sizes[rank], N) sum.
    """
    return run_checked(prepare_reduce_slots, "reduce_slots", args, kwargs, check)
