"""all-gather⊗GEMM and GEMM⊗reduce-scatter as torch custom ops, with autograd and fake kernels.

Registered with ``torch.library.custom_op`` so ``torch.compile`` treats each as one opaque node. The
process group travels by name. Backward uses the duals: the input gradient of ``ag_matmul`` is a
``matmul_rs`` and that of ``matmul_rs`` an ``ag_matmul``, on the same backend.

Here, and only here, each op is recorded in the CommLedger: one logical collective with the bytes of the
plain all-gather or reduce-scatter it computes, whatever the backend moves to get there. Failures of a
peer inside a backend surface as :class:`~odysseus.comm.failures.PeerFailure` naming it.

Layout: every backend returns ``(B, L, N)`` views of sequence-major ``(L, B, N)`` storage, and the fake
kernels promise the same strides, so compiled graphs see what eager code gets.

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


def _seq_major(B: int, L: int, N: int, like: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, L, N)`` view of sequence-major storage: the layout every backend returns."""
    return like.new_empty(L, B, N).transpose(0, 1)


@torch.library.custom_op("odysseus::ag_matmul", mutates_args=())
def ag_matmul_op(
    x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], group_name: str, backend: str, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x_local) @ w, all_gather(x_local))``: ``(B, L_r, K), (K, N)`` -> ``(B, L, N), (B, L, K)``."""
    pg = _resolve_process_group(group_name)
    with named_failures(f"ag_matmul {label}"):
        out, full = _impl(backend).ag_matmul(x_local, w, sizes, pg)
    rank, row_bytes = group_rank(pg), x_local.shape[0] * x_local.shape[2] * x_local.element_size()
    record("all_gather", *gather_bytes(sizes, rank, row_bytes), group_size(pg), "activation", label)
    return out, full


@ag_matmul_op.register_fake
def _(x_local, w, sizes, group_name, backend, label):
    B, _, K = x_local.shape
    return _seq_major(B, sum(sizes), w.shape[1], x_local), _seq_major(B, sum(sizes), K, x_local)


def _ag_setup(ctx, inputs, output):
    _, w, sizes, group_name, backend, label = inputs
    ctx.save_for_backward(output[1], w)
    ctx.args = (sizes, group_name, backend, label)


def _weight_grad(x: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """``sum over (b, l) of x[b, l]^T d_out[b, l]``, taken in sequence-major order (free for the gathered x)."""
    K, N = x.shape[-1], d_out.shape[-1]
    return x.transpose(0, 1).reshape(-1, K).t() @ d_out.transpose(0, 1).reshape(-1, N)


def _ag_backward(ctx, d_out, _d_full):
    # The gathered input is an internal output (saved for dW); nothing downstream uses it.
    full, w = ctx.saved_tensors
    sizes, group_name, backend, label = ctx.args
    dx = matmul_rs_op(d_out, w.t(), sizes, group_name, backend, label) if ctx.needs_input_grad[0] else None
    dw = _weight_grad(full, d_out) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None, None


ag_matmul_op.register_autograd(_ag_backward, setup_context=_ag_setup)


@torch.library.custom_op("odysseus::matmul_rs", mutates_args=())
def matmul_rs_op(
    x: torch.Tensor, w: torch.Tensor, sizes: list[int], group_name: str, backend: str, label: str
) -> torch.Tensor:
    """``reduce_scatter(x @ w)``: ``(B, L, K_r), (K_r, N)`` -> ``(B, L_r, N)``."""
    pg = _resolve_process_group(group_name)
    with named_failures(f"matmul_rs {label}"):
        out = _impl(backend).matmul_rs(x, w, sizes, pg)
    rank, row_bytes = group_rank(pg), x.shape[0] * w.shape[1] * x.element_size()
    record("reduce_scatter", *scatter_bytes(sizes, rank, row_bytes), group_size(pg), "activation", label)
    return out


@matmul_rs_op.register_fake
def _(x, w, sizes, group_name, backend, label):
    rank = group_rank(_resolve_process_group(group_name))
    return _seq_major(x.shape[0], sizes[rank], w.shape[1], x)


def _rs_setup(ctx, inputs, output):
    x, w, sizes, group_name, backend, label = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (sizes, group_name, backend, label)


def _rs_backward(ctx, d_out):
    x, w = ctx.saved_tensors
    sizes, group_name, backend, label = ctx.args
    dx, d_full = ag_matmul_op(d_out, w.t(), sizes, group_name, backend, label)
    dw = _weight_grad(x, d_full) if ctx.needs_input_grad[1] else None
    return dx if ctx.needs_input_grad[0] else None, dw, None, None, None, None


matmul_rs_op.register_autograd(_rs_backward, setup_context=_rs_setup)
