"""Raw collectives on tensors (no autograd), each reporting its real bytes to the CommLedger.

Uneven shards are padded to the largest one on the wire (gloo and NCCL want equal chunks) and trimmed
before returning; the ledger counts the unpadded bytes, which is what the algorithm must move.
``category=None`` records nothing: for a caller that records the logical op itself (the overlap ops).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..layout import all_reduce_bytes, gather_bytes, offsets, scatter_bytes
from . import ledger
from ._compat import all_gather_tensor, reduce_scatter_tensor
from .failures import named_failures
from .groups import group_rank, group_size


def _row_bytes(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size() if t.shape[0] else 0


def _rows_first(x: torch.Tensor, dim: int, rows: int, rank: int, who: str) -> torch.Tensor:
    """``x`` with ``dim`` moved first, after checking that it holds ``rows`` slices along ``dim``."""
    xm = x.movedim(dim, 0)
    if xm.shape[0] != rows:
        raise ValueError(f"{who}: rank {rank} holds {xm.shape[0]} rows along dim {dim}, expected {rows}")
    return xm


def all_gather(
    x: torch.Tensor, sizes: list[int], pg, dim: int = 1, *, category: str | None = "activation", label: str = ""
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``; rank i contributes ``sizes[i]`` slices."""
    if group_size(pg) == 1:
        return x
    world, rank = group_size(pg), group_rank(pg)
    xm = _rows_first(x, dim, sizes[rank], rank, "all_gather")
    m, rest = max(sizes), xm.shape[1:]
    inp = xm.contiguous()
    if sizes[rank] != m:
        inp = torch.cat([inp, inp.new_zeros(m - sizes[rank], *rest)])
    out = inp.new_empty(world * m, *rest)
    with named_failures(f"all_gather {label}"):
        all_gather_tensor(out, inp, group=pg)
    if any(s != m for s in sizes):
        out = torch.cat([out[i * m : i * m + s] for i, s in enumerate(sizes)])
    if category is not None:
        rb = _row_bytes(inp)
        ledger.record("all_gather", *gather_bytes(sizes, rank, rb), world, category, label, pg)
    return out.movedim(0, dim)


def reduce_scatter(
    x: torch.Tensor, sizes: list[int], pg, dim: int = 1, *, category: str | None = "activation", label: str = ""
) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's ``sizes[rank]`` slices along ``dim``."""
    world, rank = group_size(pg), group_rank(pg)
    if world == 1:
        return x
    xm, m = _rows_first(x, dim, sum(sizes), rank, "reduce_scatter"), max(sizes)
    rest = xm.shape[1:]
    if all(s == m for s in sizes):
        inp = xm.contiguous()
    else:
        inp = xm.new_zeros(world * m, *rest)
        o = offsets(sizes)
        for i, s in enumerate(sizes):
            inp[i * m : i * m + s] = xm[o[i] : o[i + 1]]
    out = inp.new_empty(m, *rest)
    with named_failures(f"reduce_scatter {label}"):
        reduce_scatter_tensor(out, inp, group=pg)
    if category is not None:
        rb = _row_bytes(inp)
        ledger.record("reduce_scatter", *scatter_bytes(sizes, rank, rb), world, category, label, pg)
    return out[: sizes[rank]].movedim(0, dim)


def all_to_all(
    chunks: list[torch.Tensor], recv_numels: list[int], pg, *, category: str = "activation", label: str = ""
) -> list[torch.Tensor]:
    """Send ``chunks[j]`` (any shape, flattened) to rank j; return the flat chunk received from each rank."""
    world, rank = group_size(pg), group_rank(pg)
    if world == 1:
        return [chunks[0].reshape(-1)]
    send = torch.cat([c.reshape(-1) for c in chunks])
    recv = send.new_empty(sum(recv_numels))
    with named_failures(f"all_to_all {label}"):
        dist.all_to_all_single(
            recv, send, output_split_sizes=recv_numels, input_split_sizes=[c.numel() for c in chunks], group=pg
        )
    es = send.element_size()
    sent = sum(c.numel() for j, c in enumerate(chunks) if j != rank) * es
    received = (sum(recv_numels) - recv_numels[rank]) * es
    ledger.record("all_to_all", sent, received, world, category, label, pg)
    return list(recv.split(recv_numels))


def all_reduce(x: torch.Tensor, pg, *, category: str = "activation", label: str = "") -> torch.Tensor:
    """Sum ``x`` over ranks and return the sum: ``x`` itself, summed in place, in eager mode; a new tensor
    under ``torch.compile`` (callers use the returned tensor, never ``x`` afterwards).

    Counted as a reduce-scatter plus an all-gather (:func:`odysseus.layout.all_reduce_bytes`).
    """
    world, rank = group_size(pg), group_rank(pg)
    if world == 1:
        return x
    with named_failures(f"all_reduce {label}"):
        if torch.compiler.is_compiling():
            # Traced, an in-place dist.all_reduce becomes `x.copy_(all_reduce(x))`. Where x is what an
            # autograd.Function returns (reduce_from_tp sums a clone in place), torch 2.11's AOTAutograd gave
            # that output a zero tangent in the joint graph (TORCH_LOGS=aot_graphs, a tp block): the backward
            # then depended on no tangent, the partitioner moved it into the forward graph, and every gradient
            # upstream of the all-reduce came out as zeros (2.13 and 2.15 were right). The functional
            # all-reduce returns a fresh tensor, which traces correctly; eager keeps the in-place one.
            x = funcol.all_reduce(x, "sum", pg)
        else:
            dist.all_reduce(x, group=pg)
    moved = all_reduce_bytes(x.numel(), world, rank, x.element_size())
    ledger.record("all_reduce", moved, moved, world, category, label, pg)
    return x
