"""Differentiable sequence/head collectives, each paired with its dual (adjoint) in backward.

Convention for sequence-split code: the global loss is the sum of the ranks' local losses. Under it,
the adjoint of an all-gather is a reduce-scatter, and the adjoint of taking one's shard of a replicated
tensor is an all-gather (every rank then holds the replicated tensor's full gradient).
"""

from __future__ import annotations

import torch

from . import primitives as P
from .groups import group_rank, group_size
from .sizes import offsets


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, pg, dim, label):
        ctx.args = (sizes, pg, dim, label)
        return P.all_gather(x, sizes, pg, dim, label=label)

    @staticmethod
    def backward(ctx, g):
        sizes, pg, dim, label = ctx.args
        return P.reduce_scatter(g, sizes, pg, dim, label=label), None, None, None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, pg, dim, label):
        ctx.args = (sizes, pg, dim, label)
        return P.reduce_scatter(x, sizes, pg, dim, label=label)

    @staticmethod
    def backward(ctx, g):
        sizes, pg, dim, label = ctx.args
        return P.all_gather(g, sizes, pg, dim, label=label), None, None, None, None


class _SplitSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, pg, dim, label):
        ctx.args = (sizes, pg, dim, label)
        o = offsets(sizes)
        r = group_rank(pg)
        return x.narrow(dim, o[r], sizes[r]).contiguous()

    @staticmethod
    def backward(ctx, g):
        sizes, pg, dim, label = ctx.args
        return P.all_gather(g, sizes, pg, dim, label=label), None, None, None, None


def all_gather_seq(x: torch.Tensor, sizes: list[int], pg, dim: int = 1, label: str = "") -> torch.Tensor:
    """``x: (.., sizes[rank], ..)`` -> ``(.., sum(sizes), ..)`` along ``dim``; reduce-scatter in backward."""
    return _AllGatherSeq.apply(x, sizes, pg, dim, label)


def reduce_scatter_seq(x: torch.Tensor, sizes: list[int], pg, dim: int = 1, label: str = "") -> torch.Tensor:
    """``x: (.., sum(sizes), ..)`` partial sums -> this rank's summed ``sizes[rank]`` slice; all-gather in backward."""
    return _ReduceScatterSeq.apply(x, sizes, pg, dim, label)


def split_seq(x: torch.Tensor, sizes: list[int], pg, dim: int = 1, label: str = "") -> torch.Tensor:
    """This rank's slice of a replicated ``x``; all-gather of the gradient in backward."""
    return _SplitSeq.apply(x, sizes, pg, dim, label)


# --- all-to-all between sequence-split and head-split layouts (Ulysses) -------------------------------


def _seq_to_heads(x, seq_sizes, ranges, pg, label):
    """``x: (B, L_r, H, D)`` -> ``(B, L, e_r - s_r, D)`` where ``ranges[j] = (s_j, e_j)`` go to rank j."""
    r = group_rank(pg)
    B, _, _, D = x.shape
    n_r = ranges[r][1] - ranges[r][0]
    chunks = [x[:, :, s:e] for s, e in ranges]
    got = P.all_to_all(chunks, [B * L_i * n_r * D for L_i in seq_sizes], pg, label=label)
    return torch.cat([c.view(B, L_i, n_r, D) for c, L_i in zip(got, seq_sizes)], dim=1)


def _heads_to_seq(x, seq_sizes, ranges, num_heads, pg, label):
    """Adjoint of :func:`_seq_to_heads`: ``(B, L, n_r, D)`` -> ``(B, L_r, num_heads, D)``, summing overlaps."""
    r = group_rank(pg)
    B, _, _, D = x.shape
    o = offsets(seq_sizes)
    chunks = [x[:, o[j] : o[j + 1]] for j in range(len(seq_sizes))]
    L_r = seq_sizes[r]
    got = [
        c.view(B, L_r, e - s, D)
        for c, (s, e) in zip(P.all_to_all(chunks, [B * L_r * (e - s) * D for s, e in ranges], pg, label=label), ranges)
    ]
    if all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)) and ranges[-1][1] == num_heads:
        return torch.cat(got, dim=2)
    out = x.new_zeros(B, L_r, num_heads, D)
    for c, (s, e) in zip(got, ranges):
        out[:, :, s:e] += c
    return out


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seq_sizes, ranges, pg, label):
        ctx.args = (seq_sizes, ranges, x.shape[2], pg, label)
        return _seq_to_heads(x, seq_sizes, ranges, pg, label)

    @staticmethod
    def backward(ctx, g):
        seq_sizes, ranges, num_heads, pg, label = ctx.args
        return _heads_to_seq(g, seq_sizes, ranges, num_heads, pg, label), None, None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seq_sizes, ranges, num_heads, pg, label):
        ctx.args = (seq_sizes, ranges, pg, label)
        return _heads_to_seq(x, seq_sizes, ranges, num_heads, pg, label)

    @staticmethod
    def backward(ctx, g):
        seq_sizes, ranges, pg, label = ctx.args
        return _seq_to_heads(g, seq_sizes, ranges, pg, label), None, None, None, None, None


def seq_to_heads(
    x: torch.Tensor, seq_sizes: list[int], ranges: list[tuple[int, int]], pg, label: str = ""
) -> torch.Tensor:
    """All-to-all ``x: (B, L_r, H, D)`` (sequence shard, all heads) -> ``(B, L, n_r, D)`` (all tokens,
    heads ``ranges[rank]``). Ranges may overlap (a kv head needed by several ranks); backward sums them.
    """
    return _SeqToHeads.apply(x, seq_sizes, ranges, pg, label)


def heads_to_seq(
    x: torch.Tensor, seq_sizes: list[int], ranges: list[tuple[int, int]], num_heads: int, pg, label: str = ""
) -> torch.Tensor:
    """All-to-all ``x: (B, L, n_r, D)`` (heads ``ranges[rank]``) -> ``(B, L_r, num_heads, D)``; the inverse
    all-to-all in backward."""
    return _HeadsToSeq.apply(x, seq_sizes, ranges, num_heads, pg, label)


# --- Megatron TP: copy (identity fwd, all-reduce bwd) and reduce (all-reduce fwd, identity bwd) --------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, label):
        ctx.args = (pg, label)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        pg, label = ctx.args
        return P.all_reduce(g.contiguous().clone(), pg, label=label), None, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, label):
        return P.all_reduce(x.contiguous().clone(), pg, label=label)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def copy_to_tp(x: torch.Tensor, pg, label: str = "") -> torch.Tensor:
    """Identity; all-reduces the gradient (entry of a column-split region)."""
    return x if group_size(pg) == 1 else _CopyToTP.apply(x, pg, label)


def reduce_from_tp(x: torch.Tensor, pg, label: str = "") -> torch.Tensor:
    """All-reduce (exit of a row-split region); identity gradient."""
    return x if group_size(pg) == 1 else _ReduceFromTP.apply(x, pg, label)
