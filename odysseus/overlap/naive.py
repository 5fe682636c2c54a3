"""The baseline backend: one whole collective, then one matmul."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..comm import primitives
from .stream import Piece, Ring

OVERLAPS_DGRAD = False
"""A streamed backward runs the input gradient's GEMM⊗reduce-scatter first, then the re-gather."""


def ag_matmul(x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], pg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x_local) @ w, all_gather(x_local))`` with ``x_local: (B, L_r, K)``, ``w: (K, N)``.

    Gathered sequence-major (the collective moves each rank's tokens as one block); returns views.
    """
    full = primitives.all_gather(x_local.transpose(0, 1), sizes, pg, 0, category=None)
    return (full @ w).transpose(0, 1), full.transpose(0, 1)


def matmul_rs(x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, ring: Ring | None = None) -> torch.Tensor:
    """``reduce_scatter(x @ w)`` with ``x: (B, L, K_r)``, ``w: (K_r, N)`` -> ``(B, L_r, N)``, a sequence-major view."""
    partial = x.transpose(0, 1) @ w
    return primitives.reduce_scatter(partial, sizes, pg, 0, category=None).transpose(0, 1)


def gather_stream(x_local: torch.Tensor, sizes: list[int], pg, ring: Ring) -> Iterator[Piece]:
    """The whole gathered sequence as one piece: naive is the plain baseline and keeps no ring."""
    full = primitives.all_gather(x_local.transpose(0, 1), sizes, pg, 0, category=None).contiguous()
    yield 0, full.shape[0], full
