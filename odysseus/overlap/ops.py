"""all-gather⊗GEMM and GEMM⊗reduce-scatter as torch custom ops, with autograd and fake kernels.

Registered with ``torch.library.custom_op`` so ``torch.compile`` treats each as one opaque node. The
process group travels by name. Backward uses the duals: the input gradient of ``ag_matmul`` is a
``matmul_rs`` and that of ``matmul_rs`` an ``ag_matmul``, on the same backend.

Here, and only here, each op is recorded in the CommLedger: one logical collective with the bytes of the
plain all-gather or reduce-scatter it computes, whatever the backend moves to get there. Failures of a
peer inside a backend surface as :class:`~odysseus.comm.failures.PeerFailure` naming it.

Layout: every backend returns ``(B, L, N)`` views of sequence-major ``(L, B, N)`` storage, and the fake
kernels promise the same strides, so compiled graphs see what eager code gets.

Ranks: every op takes this rank's index in the group as an argument, and the fake kernels read it from
there, never from the process group. A compiled graph is cached on disk under a key made of the graph and
its constant arguments; were the rank read inside the fake kernel, two ranks with the same input shapes
would share one key and one would load a graph shaped for the other's shard.

Autocast: under ``torch.autocast`` each op casts its floating-point inputs to the autocast dtype, as
``torch.matmul`` does, and runs with autocast off (:func:`_register_autocast`).

Memory against traffic: ``ag_matmul`` keeps the gathered input ``(B, L, K)`` for the weight gradient
instead of re-gathering it in backward. Re-gathering would add one all-gather per op to every backward
(TP-SP would move 6 instead of 4 all-gathers per block); keeping costs ``B*L*K`` elements per op, which
the naive autograd path keeps as well, so every backend has the same memory and the same ledger.
"""

from __future__ import annotations

import torch
from torch.distributed.distributed_c10d import _resolve_process_group

from ..comm.failures import named_failures
from ..comm.groups import group_rank, group_size
from ..comm.ledger import record
from ..layout import gather_bytes, scatter_bytes


def _impl(backend: str):
    if backend == "naive":
        from . import naive as impl
    elif backend == "pipelined":
        from . import pipelined as impl
    elif backend == "symm":
        from . import symm as impl
    else:
        raise ValueError(f"unknown overlap backend {backend!r}")
    return impl


def _check_rank(rank: int, pg, sizes: list[int], local_len: int | None, op: str) -> None:
    """A graph compiled for another rank (a shared compile cache gone wrong) fails here, before any traffic."""
    if rank != group_rank(pg) or (local_len is not None and local_len != sizes[rank]):
        raise RuntimeError(
            f"odysseus.{op} was called for rank {rank} (shard of {sizes[rank]} of lengths {sizes}) on rank "
            f"{group_rank(pg)} with a shard of {local_len}: a compiled graph built for another rank?"
        )


def _seq_major(B: int, L: int, N: int, like: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, L, N)`` view of sequence-major storage: the layout every backend returns."""
    return like.new_empty(L, B, N).transpose(0, 1)


@torch.library.custom_op("odysseus::ag_matmul", mutates_args=())
def ag_matmul_op(
    x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], rank: int, group_name: str, backend: str, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x_local) @ w, all_gather(x_local))``: ``(B, L_r, K), (K, N)`` -> ``(B, L, N), (B, L, K)``."""
    pg = _resolve_process_group(group_name)
    _check_rank(rank, pg, sizes, x_local.shape[1], "ag_matmul")
    with named_failures(f"ag_matmul {label}"):
        out, full = _impl(backend).ag_matmul(x_local, w, sizes, pg)
    row_bytes = x_local.shape[0] * x_local.shape[2] * x_local.element_size()
    record("all_gather", *gather_bytes(sizes, rank, row_bytes), group_size(pg), "activation", label)
    return out, full


@ag_matmul_op.register_fake
def _(x_local, w, sizes, rank, group_name, backend, label):
    B, _, K = x_local.shape
    return _seq_major(B, sum(sizes), w.shape[1], x_local), _seq_major(B, sum(sizes), K, x_local)


def _ag_setup(ctx, inputs, output):
    _, w, *args = inputs
    ctx.save_for_backward(output[1], w)
    ctx.args = args


def _weight_grad(x: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """``sum over (b, l) of x[b, l]^T d_out[b, l]``, taken in sequence-major order (free for the gathered x)."""
    K, N = x.shape[-1], d_out.shape[-1]
    return x.transpose(0, 1).reshape(-1, K).t() @ d_out.transpose(0, 1).reshape(-1, N)


def _ag_backward(ctx, d_out, _d_full):
    # The gathered input is an internal output (saved for dW); nothing downstream uses it.
    full, w = ctx.saved_tensors
    dx = matmul_rs_op(d_out, w.t(), *ctx.args) if ctx.needs_input_grad[0] else None
    dw = _weight_grad(full, d_out) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None, None, None


ag_matmul_op.register_autograd(_ag_backward, setup_context=_ag_setup)


@torch.library.custom_op("odysseus::matmul_rs", mutates_args=())
def matmul_rs_op(
    x: torch.Tensor, w: torch.Tensor, sizes: list[int], rank: int, group_name: str, backend: str, label: str
) -> torch.Tensor:
    """``reduce_scatter(x @ w)``: ``(B, L, K_r), (K_r, N)`` -> ``(B, L_r, N)`` with ``L_r = sizes[rank]``."""
    pg = _resolve_process_group(group_name)
    _check_rank(rank, pg, sizes, None, "matmul_rs")
    with named_failures(f"matmul_rs {label}"):
        out = _impl(backend).matmul_rs(x, w, sizes, pg)
    row_bytes = x.shape[0] * w.shape[1] * x.element_size()
    record("reduce_scatter", *scatter_bytes(sizes, rank, row_bytes), group_size(pg), "activation", label)
    return out


@matmul_rs_op.register_fake
def _(x, w, sizes, rank, group_name, backend, label):
    return _seq_major(x.shape[0], sizes[rank], w.shape[1], x)


def _rs_setup(ctx, inputs, output):
    x, w, *args = inputs
    ctx.save_for_backward(x, w)
    ctx.args = args


def _rs_backward(ctx, d_out):
    x, w = ctx.saved_tensors
    dx, d_full = ag_matmul_op(d_out, w.t(), *ctx.args)
    dw = _weight_grad(x, d_full) if ctx.needs_input_grad[1] else None
    return dx if ctx.needs_input_grad[0] else None, dw, None, None, None, None, None


matmul_rs_op.register_autograd(_rs_backward, setup_context=_rs_setup)


def _autocast_kernel(op, device_type: str):
    """Cast like ``torch.matmul`` under autocast: floating inputs on ``device_type`` other than fp64 go to the
    autocast dtype; then the op runs with autocast off, so its backends' matmuls keep that dtype."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [
            a.to(dtype)
            if isinstance(a, torch.Tensor)
            and a.is_floating_point()
            and a.dtype != torch.float64
            and a.device.type == device_type
            else a
            for a in args
        ]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast)

    return kernel


_AUTOCAST_LIB = torch.library.Library("odysseus", "FRAGMENT")  # holds the registrations for the process


def _register_autocast() -> None:
    """``torch.library.register_autocast`` casts to one fixed dtype; these ops follow the autocast context's."""
    for op, name in ((ag_matmul_op, "ag_matmul"), (matmul_rs_op, "matmul_rs")):
        for device_type in ("cpu", "cuda"):
            if torch.amp.is_autocast_available(device_type):
                key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
                _AUTOCAST_LIB.impl(name, _autocast_kernel(op, device_type), key, with_keyset=True)


_register_autocast()
