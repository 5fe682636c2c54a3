"""all-gather⊗GEMM and GEMM⊗reduce-scatter as torch custom ops, with autograd and fake kernels.

Registered with ``torch.library.custom_op`` so ``torch.compile`` treats each as one opaque node. The
process group travels by name. Backward uses the duals: the input gradient of ``ag_matmul`` is a
``matmul_rs`` and that of ``matmul_rs`` an ``ag_matmul``, on the same backend.

Memory against traffic: ``ag_matmul`` keeps the gathered input ``(B, L, K)`` for the weight gradient
instead of re-gathering it in backward. Re-gathering would add one all-gather per op to every backward
(TP-SP would move 6 instead of 4 all-gathers per block); keeping costs ``B*L*K`` elements per op, which
the naive autograd path keeps as well, so every backend has the same memory and the same ledger.
"""

from __future__ import annotations

import torch
from torch.distributed.distributed_c10d import _resolve_process_group

from ..comm.groups import group_rank


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


@torch.library.custom_op("odysseus::ag_matmul", mutates_args=())
def ag_matmul_op(
    x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], group_name: str, backend: str, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x_local) @ w, all_gather(x_local))``: ``(B, L_r, K), (K, N)`` -> ``(B, L, N), (B, L, K)``."""
    return _impl(backend).ag_matmul(x_local, w, sizes, _resolve_process_group(group_name), label)


@ag_matmul_op.register_fake
def _(x_local, w, sizes, group_name, backend, label):
    B, _, K = x_local.shape
    return x_local.new_empty(B, sum(sizes), w.shape[1]), x_local.new_empty(B, sum(sizes), K)


def _ag_setup(ctx, inputs, output):
    _, w, sizes, group_name, backend, label = inputs
    ctx.save_for_backward(output[1], w)
    ctx.args = (sizes, group_name, backend, label)


def _ag_backward(ctx, d_out, _d_full):
    # The gathered input is an internal output (saved for dW); nothing downstream uses it.
    full, w = ctx.saved_tensors
    sizes, group_name, backend, label = ctx.args
    dx = matmul_rs_op(d_out, w.t(), sizes, group_name, backend, label) if ctx.needs_input_grad[0] else None
    dw = full.flatten(0, 1).t() @ d_out.flatten(0, 1) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None, None


ag_matmul_op.register_autograd(_ag_backward, setup_context=_ag_setup)


@torch.library.custom_op("odysseus::matmul_rs", mutates_args=())
def matmul_rs_op(
    x: torch.Tensor, w: torch.Tensor, sizes: list[int], group_name: str, backend: str, label: str
) -> torch.Tensor:
    """``reduce_scatter(x @ w)``: ``(B, L, K_r), (K_r, N)`` -> ``(B, L_r, N)``."""
    return _impl(backend).matmul_rs(x, w, sizes, _resolve_process_group(group_name), label)


@matmul_rs_op.register_fake
def _(x, w, sizes, group_name, backend, label):
    rank = group_rank(_resolve_process_group(group_name))
    return x.new_empty(x.shape[0], sizes[rank], w.shape[1])


def _rs_setup(ctx, inputs, output):
    x, w, sizes, group_name, backend, label = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (sizes, group_name, backend, label)


def _rs_backward(ctx, d_out):
    x, w = ctx.saved_tensors
    sizes, group_name, backend, label = ctx.args
    dx, d_full = ag_matmul_op(d_out, w.t(), sizes, group_name, backend, label)
    dw = x.flatten(0, 1).t() @ d_full.flatten(0, 1) if ctx.needs_input_grad[1] else None
    return dx if ctx.needs_input_grad[0] else None, dw, None, None, None, None


matmul_rs_op.register_autograd(_rs_backward, setup_context=_rs_setup)
