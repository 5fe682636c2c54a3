"""all-gather⊗GEMM and GEMM⊗reduce-scatter along the sequence, as differentiable ops.

Backends (``backend=`` on these ops, on the modules and on ``odysseus.parallelize``):

- ``naive``: one whole collective, then one matmul; the baseline.
- ``pipelined``: the same result from per-chunk asynchronous transfers, so that a chunk is multiplied
  while the next is in flight; any process group, gloo included.
- ``symm``: CUDA symmetric memory and the Triton kernels of ``odykernels``: chunks are pulled by the copy
  engine and consumed by the GEMM as their flags are set; partial products are written straight into
  the peers' buffers.
- ``auto``: ``symm`` where it can run (CUDA tensors, symmetric memory on the group), else ``pipelined``.

Every backend records one logical collective per op in the CommLedger, with the bytes of the naive one.
"""

from __future__ import annotations

import torch

from ..comm.groups import group_size
from ..profiling import ody_range

BACKENDS = ("auto", "symm", "pipelined", "naive")


def check_backend(backend: str) -> str:
    """Validate a backend name and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown overlap backend {backend!r}; expected one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, pg, device: torch.device) -> str:
    """The concrete backend for ``backend`` on this group and device (``auto`` decided here)."""
    from . import symm

    check_backend(backend)
    if backend == "auto":
        return "symm" if symm.available(pg, device) else "pipelined"
    if backend == "symm" and not symm.available(pg, device):
        raise RuntimeError(f"backend 'symm' needs CUDA tensors and symmetric memory on the group; got {device}")
    return backend


def ag_matmul(
    x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, backend: str = "auto", label: str = ""
) -> torch.Tensor:
    """``all_gather_seq(x_local) @ w``: ``x_local: (B, L_r, K)``, ``w: (K, N)`` -> ``(B, L, N)``.

    ``sizes`` are every rank's sequence length (``odysseus.comm.exchange_lengths``); ``pg`` the group.
    """
    with ody_range("ody/ag_matmul"):
        if group_size(pg) == 1:
            return x_local @ w
        from .ops import ag_matmul_op

        backend = resolve_backend(backend, pg, x_local.device)
        return ag_matmul_op(x_local, w, list(sizes), pg.group_name, backend, label)[0]


def matmul_rs(
    x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, backend: str = "auto", label: str = ""
) -> torch.Tensor:
    """``reduce_scatter_seq(x @ w)``: ``x: (B, L, K_r)`` partial sums, ``w: (K_r, N)`` -> ``(B, L_r, N)``."""
    with ody_range("ody/matmul_rs"):
        if group_size(pg) == 1:
            return x @ w
        from .ops import matmul_rs_op

        backend = resolve_backend(backend, pg, x.device)
        return matmul_rs_op(x, w, list(sizes), pg.group_name, backend, label)
