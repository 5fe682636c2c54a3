"""The baseline backend: one whole collective, then one matmul."""

from __future__ import annotations

import torch

from ..comm import primitives


def ag_matmul(x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, label: str):
    """``(all_gather(x_local) @ w, all_gather(x_local))`` with ``x_local: (B, L_r, K)``, ``w: (K, N)``."""
    full = primitives.all_gather(x_local, sizes, pg, 1, label=label).contiguous()
    return full @ w, full


def matmul_rs(x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, label: str) -> torch.Tensor:
    """``reduce_scatter(x @ w)`` with ``x: (B, L, K_r)``, ``w: (K_r, N)`` -> ``(B, L_r, N)``."""
    return primitives.reduce_scatter(x @ w, sizes, pg, 1, label=label).contiguous()
