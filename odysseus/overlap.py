"""all-gather (x) GEMM and GEMM (x) reduce-scatter along the sequence, as differentiable ops.

Backends: ``naive`` issues one collective, then one matmul (the baseline).
"""

from __future__ import annotations

import torch

from .comm import all_gather_seq, reduce_scatter_seq

BACKENDS = ("auto", "symm", "pipelined", "naive")


def check_backend(backend: str) -> str:
    """Validate a backend name and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown overlap backend {backend!r}; expected one of {BACKENDS}")
    return backend


def ag_matmul(
    x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, backend: str = "naive", label: str = ""
) -> torch.Tensor:
    """``all_gather_seq(x_local) @ w``: ``x_local: (B, L_r, K)``, ``w: (K, N)`` -> ``(B, L, N)``.

    ``sizes`` are the ranks' sequence lengths (from :func:`odysseus.comm.exchange_lengths`).
    """
    check_backend(backend)
    return all_gather_seq(x_local, sizes, pg, 1, label) @ w


def matmul_rs(
    x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, backend: str = "naive", label: str = ""
) -> torch.Tensor:
    """``reduce_scatter_seq(x @ w)``: ``x: (B, L, K)`` (this rank's K slice), ``w: (K, N)`` -> ``(B, L_r, N)``."""
    check_backend(backend)
    return reduce_scatter_seq(x @ w, sizes, pg, 1, label)
