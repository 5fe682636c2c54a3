"""Single-process simulations of the fused kernels: every rank's buffers in one tensor, the real kernels.

They run on whatever device the inputs are on: CPU tensors go through the Triton interpreter (fp16/fp32
only), CUDA tensors through the compiled kernels on one GPU. Chunks follow :func:`split_rows`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from odykernels import _interpret
from odykernels._chunks import split_rows
from odykernels.ag_matmul import ag_matmul
from odykernels.matmul_rs import ALIGN_BYTES, matmul_rs, reduce_slots
from odykernels.signal import FLAG_DTYPE


def simulate_ag_matmul(
    a_full: torch.Tensor,
    b: torch.Tensor,
    world: int,
    rank: int,
    epoch: int = 1,
    timeout_s: float = 0.05,
    path: str | None = None,
) -> torch.Tensor:
    """What rank ``rank`` computes once the all-gather has finished: every chunk's flag holds ``epoch``.

    Args:
        a_full: (M, K) gathered input; rank c's chunk is ``split_rows(M, world)[c]`` rows.
        b: (K, N_r) rank ``rank``'s weight slice.

    Returns:
        (M, N_r) = ``a_full @ b`` through :func:`odykernels.ag_matmul`. The output starts as NaN (for float
        outputs) so a tile the kernel skipped shows up. ``path`` forces a code path (``"tma"``/``"pointer"``).
    """
    chunk_sizes = split_rows(a_full.shape[0], world)
    flags = torch.full((world,), epoch, dtype=FLAG_DTYPE, device=a_full.device)
    out = torch.full((a_full.shape[0], b.shape[1]), float("nan"), dtype=a_full.dtype, device=a_full.device)
    return ag_matmul(a_full, b, chunk_sizes, rank, flags, epoch, out=out, timeout_s=timeout_s, path=path)


class SimulatedRS:
    """Receive buffers and flags of ``world`` ranks as slices of one tensor each, with the peer offsets.

    ``recv[j]`` is rank j's (world, max_rows, N) buffer, ``flags[j]`` its uint32 (world,) flags; since all
    live in one allocation, peer offsets are differences of slice starts, as symmetric memory's are of
    buffer addresses. Rows are padded to a multiple of 16 bytes (``matmul_rs``'s alignment rule), so
    ``recv[j]`` is a view ``[..., :N]`` of the padded rows. Receive buffers start as NaN so any slot a
    producer skipped poisons the sum.
    """

    def __init__(self, chunk_sizes: list[int], N: int, dtype: torch.dtype, device: torch.device | str):
        self.chunk_sizes = list(chunk_sizes)
        self.world = len(chunk_sizes)
        max_rows = max(chunk_sizes)
        vec = ALIGN_BYTES // dtype.itemsize
        padded = torch.full(
            (self.world, self.world, max(max_rows, 1), -(-max(N, 1) // vec) * vec), float("nan"), dtype=dtype,
            device=device,
        )  # fmt: skip
        self.recv = padded[..., :N]
        self.flags = torch.zeros((self.world, self.world), dtype=FLAG_DTYPE, device=device)
        self.counters = torch.zeros((self.world, self.world), dtype=torch.int32, device=device)
        per_recv = self.recv.stride(0)
        self._recv_offsets = [
            torch.tensor([(j - r) * per_recv for j in range(self.world)], dtype=torch.int64, device=device)
            for r in range(self.world)
        ]
        self._flag_offsets = [
            torch.tensor([(j - r) * self.world for j in range(self.world)], dtype=torch.int64, device=device)
            for r in range(self.world)
        ]

    def produce(self, rank: int, a: torch.Tensor, b: torch.Tensor, epoch: int, path: str | None = None) -> None:
        """Run rank ``rank``'s :func:`matmul_rs` (a: (M, K_r), b: (K_r, N)); ``path`` forces a code path."""
        matmul_rs(
            a, b, self.chunk_sizes, rank, self.recv[rank], self._recv_offsets[rank],
            self.flags[rank], self._flag_offsets[rank], epoch, counters=self.counters[rank], path=path,
        )  # fmt: skip

    def reduce(
        self, rank: int, epoch: int, out_dtype: torch.dtype | None = None, timeout_s: float = 0.05
    ) -> torch.Tensor:
        """Run rank ``rank``'s :func:`reduce_slots` into a NaN-filled (chunk_sizes[rank], N) output."""
        recv = self.recv[rank]
        out = torch.full(
            (self.chunk_sizes[rank], recv.shape[2]), float("nan"), dtype=out_dtype or recv.dtype, device=recv.device
        )
        return reduce_slots(recv, self.flags[rank], self.chunk_sizes, rank, epoch, out=out, timeout_s=timeout_s)


def simulate_matmul_rs(
    a_per_rank: list[torch.Tensor],
    b_per_rank: list[torch.Tensor],
    world: int,
    epoch: int = 1,
    path: str | None = None,
) -> list[torch.Tensor]:
    """Every rank's share of ``sum_r a_per_rank[r] @ b_per_rank[r]``, through the real kernels.

    All producers run first (as if every rank finished its GEMM), then every rank's reduction.

    Args:
        a_per_rank: ``world`` tensors (M, K_r).
        b_per_rank: ``world`` tensors (K_r, N).
        path: ``"tma"`` or ``"pointer"`` forces the producers' code path (default: automatic).

    Returns:
        ``world`` tensors; entry d is (split_rows(M, world)[d], N), rows of chunk d of the sum.
    """
    if len(a_per_rank) != world or len(b_per_rank) != world:
        raise ValueError(f"expected {world} a and b tensors, got {len(a_per_rank)} and {len(b_per_rank)}")
    M, N = a_per_rank[0].shape[0], b_per_rank[0].shape[1]
    sim = SimulatedRS(split_rows(M, world), N, a_per_rank[0].dtype, a_per_rank[0].device)
    for r in range(world):
        sim.produce(r, a_per_rank[r], b_per_rank[r], epoch, path)
    return [sim.reduce(d, epoch) for d in range(world)]


@contextlib.contextmanager
def program_order(seed: int | None) -> Iterator[None]:
    """Interpreted launches inside run their programs in orders drawn from ``seed`` (None: index order);
    afterwards the process's default (``ODYSSEUS_PROGRAM_ORDER_SEED``) again. See :mod:`odykernels._interpret`."""
    _interpret.set_program_order(seed)
    try:
        yield
    finally:
        _interpret.program_order_seed_from_env()
