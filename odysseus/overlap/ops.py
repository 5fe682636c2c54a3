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

Autocast: under ``torch.autocast`` each forward op casts its floating-point inputs to the autocast dtype, as
``torch.matmul`` does, and runs with autocast off (:func:`_register_autocast`).

Memory against traffic, ``save_input``:

- ``"gathered"``: ``ag_matmul`` keeps the gathered input ``(B, L, K)`` for the weight gradient, and
  ``matmul_rs``'s backward gathers the whole output gradient. No gather is repeated.
- ``"shard"``: ``ag_matmul`` keeps only this rank's shard and re-gathers it in backward, and every gather
  streams the sequence through a small ring of slots (:mod:`.stream`), so nothing of size ``L x K`` exists
  at any time. Costs one more all-gather per ``ag_matmul`` in backward (recorded in the ledger).
"""

from __future__ import annotations

import torch
from torch.distributed.distributed_c10d import _resolve_process_group

from ..comm.failures import named_failures
from ..comm.groups import group_rank, group_size
from ..comm.ledger import record
from ..layout import gather_bytes, scatter_bytes
from . import stream
from .stream import Ring

SAVE_INPUT = ("gathered", "shard")


def check_save_input(save_input: str) -> str:
    """Validate a ``save_input`` choice and return it."""
    if save_input not in SAVE_INPUT:
        raise ValueError(f"unknown save_input {save_input!r}; expected one of {SAVE_INPUT}")
    return save_input


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


def _record(op: str, pg, sizes: list[int], rank: int, batch: int, width: int, elem: int, label: str) -> None:
    """The one ledger record of a logical all-gather or reduce-scatter of rows of ``batch x width x elem`` bytes."""
    rule = gather_bytes if op == "all_gather" else scatter_bytes
    record(op, *rule(sizes, rank, batch * width * elem), group_size(pg), "activation", label, pg)


def _ring(tokens: int, slots: int) -> Ring:
    return Ring(tokens or None, slots)


# --- all-gather⊗GEMM ----------------------------------------------------------------------------------


@torch.library.custom_op("odysseus::ag_matmul", mutates_args=())
def ag_matmul_op(
    x_local: torch.Tensor,
    w: torch.Tensor,
    sizes: list[int],
    rank: int,
    group_name: str,
    backend: str,
    label: str,
    save_input: str,
    ring_tokens: int,
    ring_slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x_local) @ w, kept)``: ``(B, L_r, K), (K, N)`` -> ``(B, L, N)`` and, for ``"gathered"``,
    the gathered input ``(B, L, K)`` (kept for the weight gradient), for ``"shard"`` an empty tensor."""
    pg, impl = _resolve_process_group(group_name), _impl(backend)
    _check_rank(rank, pg, sizes, x_local.shape[1], "ag_matmul")
    B, _, K = x_local.shape
    with named_failures(f"ag_matmul {label}"):
        if save_input == "gathered":
            out, kept = impl.ag_matmul(x_local, w, sizes, pg)
        else:
            pieces = impl.gather_stream(x_local, sizes, pg, _ring(ring_tokens, ring_slots))
            out, kept = stream.ag_matmul(pieces, w, sum(sizes), B), x_local.new_empty(0)
    _record("all_gather", pg, sizes, rank, B, K, x_local.element_size(), label)
    return out, kept


@ag_matmul_op.register_fake
def _(x_local, w, sizes, rank, group_name, backend, label, save_input, ring_tokens, ring_slots):
    B, _, K = x_local.shape
    kept = _seq_major(B, sum(sizes), K, x_local) if save_input == "gathered" else x_local.new_empty(0)
    return _seq_major(B, sum(sizes), w.shape[1], x_local), kept


def _ag_setup(ctx, inputs, output):
    x_local, w, *args = inputs
    save_input = args[5]
    ctx.save_for_backward(output[1] if save_input == "gathered" else x_local, w)
    # The kept input is an internal output: without this, autograd would hand backward a zero-filled
    # (B, L, K) gradient for it.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.args = tuple(args)


def _weight_grad(x: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """``sum over (b, l) of x[b, l]^T d_out[b, l]``, taken in sequence-major order (free for the gathered x)."""
    K, N = x.shape[-1], d_out.shape[-1]
    return x.transpose(0, 1).reshape(-1, K).t() @ d_out.transpose(0, 1).reshape(-1, N)


def _ag_backward(ctx, d_out, _d_kept):
    # The kept tensor is an internal output (saved for dW, non-differentiable): _d_kept is None.
    if d_out is None:  # the output was not used (grads are not materialised as zeros)
        return (None,) * 10
    kept, w = ctx.saved_tensors
    sizes, rank, group_name, backend, label, save_input, ring_tokens, ring_slots = ctx.args
    if save_input == "shard":
        dx, dw = ag_backward_shard_op(d_out, kept, w, sizes, rank, group_name, backend, label, ring_tokens, ring_slots)
    else:
        dx = matmul_rs_op(d_out, w.t(), *ctx.args)
        dw = _weight_grad(kept, d_out)
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, *[None] * 8)


ag_matmul_op.register_autograd(_ag_backward, setup_context=_ag_setup)


@torch.library.custom_op("odysseus::ag_backward_shard", mutates_args=())
def ag_backward_shard_op(
    d_out: torch.Tensor,
    x_local: torch.Tensor,
    w: torch.Tensor,
    sizes: list[int],
    rank: int,
    group_name: str,
    backend: str,
    label: str,
    ring_tokens: int,
    ring_slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of a ``"shard"`` all-gather⊗GEMM: ``(dx, dw)`` with ``dx = reduce_scatter(d_out @ w^T)``
    ``(B, L_r, K)`` and ``dw = gather(x)^T d_out`` ``(K, N)``, the input re-gathered piece by piece."""
    pg, impl, ring = _resolve_process_group(group_name), _impl(backend), _ring(ring_tokens, ring_slots)
    _check_rank(rank, pg, sizes, x_local.shape[1], "ag_matmul backward")
    B, _, K = x_local.shape
    pieces = impl.gather_stream(x_local, sizes, pg, ring)
    with named_failures(f"ag_matmul backward {label}"):
        dx, dw = stream.ag_backward(
            pieces, d_out, lambda: impl.matmul_rs(d_out, w.t(), sizes, pg, ring), w.dtype, impl.OVERLAPS_DGRAD
        )
    _record("reduce_scatter", pg, sizes, rank, B, K, d_out.element_size(), label)
    _record("all_gather", pg, sizes, rank, B, K, x_local.element_size(), label)
    return dx, dw


@ag_backward_shard_op.register_fake
def _(d_out, x_local, w, sizes, rank, group_name, backend, label, ring_tokens, ring_slots):
    B, L_r, K = x_local.shape
    return _seq_major(B, L_r, K, x_local), w.new_empty(w.shape)


# --- GEMM⊗reduce-scatter ------------------------------------------------------------------------------


@torch.library.custom_op("odysseus::matmul_rs", mutates_args=())
def matmul_rs_op(
    x: torch.Tensor,
    w: torch.Tensor,
    sizes: list[int],
    rank: int,
    group_name: str,
    backend: str,
    label: str,
    save_input: str,
    ring_tokens: int,
    ring_slots: int,
) -> torch.Tensor:
    """``reduce_scatter(x @ w)``: ``(B, L, K_r), (K_r, N)`` -> ``(B, L_r, N)``."""
    pg = _resolve_process_group(group_name)
    _check_rank(rank, pg, sizes, None, "matmul_rs")
    ring = _ring(ring_tokens, ring_slots) if save_input == "shard" else None
    with named_failures(f"matmul_rs {label}"):
        out = _impl(backend).matmul_rs(x, w, sizes, pg, ring)
    _record("reduce_scatter", pg, sizes, rank, x.shape[0], w.shape[1], x.element_size(), label)
    return out


@matmul_rs_op.register_fake
def _(x, w, sizes, rank, group_name, backend, label, save_input, ring_tokens, ring_slots):
    return _seq_major(x.shape[0], sizes[rank], w.shape[1], x)


def _rs_setup(ctx, inputs, output):
    x, w, *args = inputs
    ctx.save_for_backward(x, w)
    ctx.args = tuple(args)


def _rs_backward(ctx, d_out):
    x, w = ctx.saved_tensors
    sizes, rank, group_name, backend, label, save_input, ring_tokens, ring_slots = ctx.args
    if save_input == "shard":
        dx, dw = rs_backward_shard_op(d_out, x, w, sizes, rank, group_name, backend, label, ring_tokens, ring_slots)
    else:
        dx, d_full = ag_matmul_op(d_out, w.t(), *ctx.args)
        dw = _weight_grad(x, d_full) if ctx.needs_input_grad[1] else None
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, *[None] * 8)


matmul_rs_op.register_autograd(_rs_backward, setup_context=_rs_setup)


@torch.library.custom_op("odysseus::rs_backward_shard", mutates_args=())
def rs_backward_shard_op(
    d_out: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    sizes: list[int],
    rank: int,
    group_name: str,
    backend: str,
    label: str,
    ring_tokens: int,
    ring_slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of a ``"shard"`` GEMM⊗reduce-scatter: ``dx = gather(d_out) @ w^T`` ``(B, L, K_r)`` and
    ``dw = x^T gather(d_out)`` ``(K_r, N)``, the output gradient gathered piece by piece."""
    pg, impl = _resolve_process_group(group_name), _impl(backend)
    _check_rank(rank, pg, sizes, d_out.shape[1], "matmul_rs backward")
    pieces = impl.gather_stream(d_out, sizes, pg, _ring(ring_tokens, ring_slots))
    with named_failures(f"matmul_rs backward {label}"):
        dx, dw = stream.rs_backward(pieces, x, w)
    _record("all_gather", pg, sizes, rank, d_out.shape[0], d_out.shape[2], d_out.element_size(), label)
    return dx, dw


@rs_backward_shard_op.register_fake
def _(d_out, x, w, sizes, rank, group_name, backend, label, ring_tokens, ring_slots):
    return _seq_major(x.shape[0], x.shape[1], x.shape[2], x), w.new_empty(w.shape)


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
