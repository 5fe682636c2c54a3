"""all-gather⊗GEMM and GEMM⊗reduce-scatter along the sequence, as differentiable ops.

Backends (``backend=`` on these ops, on the modules and on ``odysseus.parallelize``):

- ``naive``: one whole collective, then one matmul; the baseline.
- ``pipelined``: the same result from per-chunk asynchronous transfers, so that a chunk is multiplied
  while the next is in flight; any process group, gloo included.
- ``symm``: symmetric memory and the Triton kernels of ``odykernels``: chunks are pulled by the copy
  engine and consumed by the GEMM as their flags are set; partial products are written straight into
  the peers' buffers. On CUDA through torch symmetric memory; on CPU gloo groups the same transport code
  runs over an emulated runtime (shared memory, a thread per stream) and the Triton interpreter (fp32/fp16),
  for tests.
- ``auto``: ``symm`` for CUDA tensors where every rank of the group runs on one host (node) and a first
  small call on the group agrees with ``naive``; ``pipelined`` (NCCL) for a group that spans hosts, and
  (with one warning naming the reason) where the first call fails. Decided once per group.

Every backend returns ``(B, L, N)`` views of sequence-major storage, and every op is recorded once in the
CommLedger (:mod:`.ops`), with the bytes of the logical collective.
"""

from __future__ import annotations

import torch

from ..comm.groups import group_rank, group_size
from ..profiling import ody_range
from .stream import Ring

__all__ = ["BACKENDS", "DEFAULT_RING", "Ring", "ag_matmul", "check_backend", "check_overlap", "matmul_rs"]

DEFAULT_RING = Ring()
"""Two slots of a quarter shard each (used only with ``save_input="shard"``)."""

BACKENDS = ("auto", "symm", "pipelined", "naive")
AUTO_SYMM_DEVICE_TYPES = ("cuda",)
"""Device types on which ``auto`` considers ``symm`` (the CPU stand-in exists for tests, not for speed)."""

_RESOLVED: dict[tuple, str] = {}


def check_backend(backend: str) -> str:
    """Validate a backend name and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown overlap backend {backend!r}; expected one of {BACKENDS}")
    return backend


@torch.compiler.disable  # collective and run once per (backend, group, device, dtype): never traced
def _resolve(backend: str, pg, device: torch.device, dtype: torch.dtype) -> str:
    from . import probe

    check_backend(backend)
    if backend == "auto":
        symm_ok = device.type in AUTO_SYMM_DEVICE_TYPES and probe.symm_works(pg, device, dtype)
        return "symm" if symm_ok else "pipelined"
    return backend


def resolve_backend(backend: str, pg, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend for ``backend`` on this group, device and dtype, decided once.

    ``auto`` probes ``symm`` the first time (:mod:`.probe`): collective, every rank of ``pg`` must call it.
    """
    if backend != "auto":  # nothing to decide: no call into the compiler-disabled _resolve (a graph break)
        return check_backend(backend)
    key = (backend, pg.group_name, device, dtype)
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _resolve(backend, pg, device, dtype)
    return found


def check_overlap() -> None:
    """Raise ``TimeoutError`` if a wait inside a ``symm`` kernel gave up since the process started.

    The symm backend never reads its kernels' status on the hot path (that would synchronise the host
    with the GPU on every op); :func:`odysseus.finalize_grads` calls this once per step. Call it yourself
    where you want the check elsewhere.
    """
    from . import symm

    symm.check()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op will compute in: the autocast dtype where autocast casts ``x`` (see ``ops``)."""
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _op_args(sizes: list[int], pg, backend: str, label: str, save_input: str, ring: Ring) -> tuple:
    """The non-tensor arguments of the custom ops (:mod:`.ops`), in their order."""
    return list(sizes), group_rank(pg), pg.group_name, backend, label, save_input, ring.tokens or 0, ring.slots


def ag_matmul(
    x_local: torch.Tensor,
    w: torch.Tensor,
    sizes: list[int],
    pg,
    backend: str = "auto",
    label: str = "",
    save_input: str = "gathered",
    ring: Ring = DEFAULT_RING,
) -> torch.Tensor:
    """``all_gather_seq(x_local) @ w``: ``x_local: (B, L_r, K)``, ``w: (K, N)`` -> ``(B, L, N)``.

    ``sizes`` are every rank's sequence length (``odysseus.comm.exchange_lengths``); ``pg`` the group.
    ``save_input`` and ``ring``: what is kept for backward and how gathers stream (:mod:`.ops`, :mod:`.stream`).
    """
    if group_size(pg) == 1:
        with ody_range("ody/ag_matmul"):
            return x_local @ w
    from .ops import ag_matmul_op

    # Resolved outside the profiler range: the first resolution is a graph break under torch.compile, and
    # dynamo cannot resume a frame that breaks inside a context manager (it would run the frame eagerly).
    backend = resolve_backend(backend, pg, x_local.device, _compute_dtype(x_local))
    with ody_range("ody/ag_matmul"):
        return ag_matmul_op(x_local, w, *_op_args(sizes, pg, backend, label, save_input, ring))[0]


def matmul_rs(
    x: torch.Tensor,
    w: torch.Tensor,
    sizes: list[int],
    pg,
    backend: str = "auto",
    label: str = "",
    save_input: str = "gathered",
    ring: Ring = DEFAULT_RING,
) -> torch.Tensor:
    """``reduce_scatter_seq(x @ w)``: ``x: (B, L, K_r)`` partial sums, ``w: (K_r, N)`` -> ``(B, L_r, N)``."""
    if group_size(pg) == 1:
        with ody_range("ody/matmul_rs"):
            return x @ w
    from .ops import matmul_rs_op

    backend = resolve_backend(backend, pg, x.device, _compute_dtype(x))  # outside the range: see ag_matmul
    with ody_range("ody/matmul_rs"):
        return matmul_rs_op(x, w, *_op_args(sizes, pg, backend, label, save_input, ring))
