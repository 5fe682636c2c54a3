"""Sequence collectives with autograd duals, uneven shards, and the CommLedger that counts them."""

from __future__ import annotations

import torch

from ..layout import check_layout
from .autograd import (
    all_gather_seq,
    copy_to_tp,
    heads_to_seq,
    reduce_from_tp,
    reduce_scatter_seq,
    seq_to_heads,
    split_seq,
)
from .groups import group_rank, group_size, meta_group
from .ledger import CommLedger, CommRecord, record
from .lengths import exchange_lengths
from .mesh import check_default_group, resolve_group, ring_mesh
from .ring_layout import gather_ring, shard_ring
from .sizes import head_ranges, kv_range, offsets, shard_sizes

__all__ = [
    "CommLedger",
    "CommRecord",
    "all_gather_seq",
    "check_layout",
    "copy_to_tp",
    "exchange_lengths",
    "gather_sequence",
    "group_rank",
    "group_size",
    "head_ranges",
    "heads_to_seq",
    "kv_range",
    "meta_group",
    "offsets",
    "record",
    "reduce_from_tp",
    "reduce_scatter_seq",
    "resolve_group",
    "seq_to_heads",
    "shard_sequence",
    "shard_sizes",
    "split_seq",
]


def _check_dim(x: torch.Tensor, dim: int, who: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{who}: dim={dim} is out of range for a tensor with {x.dim()} dims {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of ``x`` along ``dim`` (default: the sequence dim of ``(batch, seq, ...)``).

    ``L = q*N + r`` tokens give ``q+1`` to ranks ``0..r-1`` and ``q`` to the rest; nothing is padded.
    No communication in forward; in backward the shard gradients are all-gathered, so a replicated
    ``x`` that requires grad gets its full gradient on every rank.
    """
    dim = _check_dim(x, dim, "shard_sequence")
    if group is None:
        check_default_group("shard_sequence")
    if ring_mesh(group) is not None:
        return shard_ring(x, ring_mesh(group), dim)
    pg = resolve_group(group)
    sizes = shard_sizes(x.shape[dim], group_size(pg))
    check_layout(sizes, "shard_sequence")
    return split_seq(x, sizes, pg, dim, "shard_sequence")


def gather_sequence(x_local: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Concatenate the ranks' shards along ``dim`` (inverse of :func:`shard_sequence`).

    Under the sum-of-local-losses convention its backward is a reduce-scatter of the gradient.
    """
    dim = _check_dim(x_local, dim, "gather_sequence")
    if group is None:
        check_default_group("gather_sequence")
    if ring_mesh(group) is not None:
        return gather_ring(x_local, ring_mesh(group), dim)
    pg = resolve_group(group)
    sizes = exchange_lengths(x_local.shape[dim], pg, "gather_sequence")
    return all_gather_seq(x_local, sizes, pg, dim, "gather_sequence")
