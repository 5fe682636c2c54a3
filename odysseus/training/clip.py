"""Gradient clipping by the norm of the whole (unsplit) model's gradient.

``torch.nn.utils.clip_grad_norm_`` sees only this rank's tensors: on a split model it computes a per-rank
norm (so ranks clip by different factors and replicated weights drift apart), and it refuses the mix of
plain tensors and FSDP2's DTensors. :func:`clip_grad_norm_` counts every entry of the dense gradient
once:

- a weight split over the group (heads, FFN columns) is summed over the group's ranks; rows held by
  several ranks (a kv head read by query heads of two ranks) count on the first of them only;
- a replicated weight (norms, whole FFN or attention weights, embeddings and LM head) counts once, from
  this rank's copy: call it after ``finalize_grads`` / ``finalize_model_grads``, when those copies are whole
  and equal on every rank;
- a DTensor gradient (ZeRO-3) is summed over the mesh dimensions that shard it and counted once over those
  that replicate it: ZeRO-3 over ``sp``, hybrid (replicate over ``dp``, shard over ``sp``) or over all ranks.

On a 2-D (dp, sp) mesh nothing crosses ``dp``: after ``finalize_grads`` every replica holds the same, whole
gradients, so each computes the norm of the dense model over the whole mesh within its own ``sp`` group
(``tests/test_mesh.py`` checks it for every strategy and ZeRO-3 mode).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..comm.failures import named_failures
from ..comm.groups import group_rank, group_size
from ..comm.ledger import record
from ..strategies.module import ParamSpec, live_specs
from .state import _specs, is_dtensor


def _owned(spec: ParamSpec, rank: int) -> tuple[int, int]:
    """The local rows ``[start, end)`` of a split weight that this rank counts: those no lower rank holds."""
    s, e = spec.ranges[rank]
    before = max((spec.ranges[j][1] for j in range(rank)), default=s)
    return min(max(s, before), e) - s, e - s


def _classify(model_or_params) -> list[tuple[nn.Parameter, ParamSpec, object]]:
    """(parameter, spec, group) of every parameter that requires grad; unknown parameters are replicated."""
    if isinstance(model_or_params, nn.Module):
        specs = _specs(model_or_params)
        named = model_or_params.named_parameters()
        return [(p, *specs.get(n, (ParamSpec(), None))) for n, p in named if p.requires_grad]
    params = [model_or_params] if isinstance(model_or_params, torch.Tensor) else list(model_or_params)
    wanted = {id(p) for p in params}
    by_id = {}
    for m, name, spec in live_specs():  # bare parameters: find the parallel module that holds each one
        p = m.get_parameter(name)
        if id(p) in wanted:
            by_id[id(p)] = (spec, m.pg)
    return [(p, *by_id.get(id(p), (ParamSpec(), None))) for p in params if p.requires_grad]


def _local_piece(p: nn.Parameter, spec: ParamSpec, pg) -> tuple[torch.Tensor | None, tuple]:
    """This rank's share of ``p.grad`` to count, and the groups to sum it over (in order)."""
    g = p.grad
    if is_dtensor(p):
        mesh = p.device_mesh
        groups = []
        for dim, placement in enumerate(p.placements):
            if placement.is_partial():
                raise RuntimeError("clip_grad_norm_: a gradient is still a partial sum (Partial placement)")
            if placement.is_shard():
                groups.append(mesh.get_group(dim))
        return (None if g is None else g.to_local()), tuple(groups)
    if spec.dim is None or group_size(pg) == 1:
        return g, ()
    start, end = _owned(spec, group_rank(pg))
    return (None if g is None else g.narrow(spec.dim, start, end - start)), (pg,)


@torch.no_grad()
def grad_norm(model_or_params, norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type``-norm of the dense model's gradient (an fp32 scalar, fp64 for fp64 weights), the same
    on every rank.

    ``model_or_params``: a model (or module) holding odysseus parallel modules, or an iterable of its
    parameters. Parameters without ``requires_grad`` (frozen) and without a gradient are skipped.
    Collective over the groups that split a weight: call on every rank, after ``finalize_grads``.
    """
    return _norm(_classify(model_or_params), float(norm_type))


def _norm(classified: list, p_norm: float) -> torch.Tensor:
    pieces = [_local_piece(p, spec, pg) for p, spec, pg in classified]
    device = next((t.device for t, _ in pieces if t is not None), torch.device("cpu"))
    # fp32 sums (fp64 for fp64 weights), from the parameters' dtypes: the same on every rank.
    dtype = torch.float64 if any(p.dtype == torch.float64 for p, _, _ in classified) else torch.float32
    totals: dict[tuple, torch.Tensor] = {}  # groups to sum over -> this rank's sum of |g|^p (or max |g|)
    for t, groups in pieces:  # keys come from the parameters, not the gradients: the same on every rank
        acc = totals.setdefault(groups, torch.zeros((), dtype=dtype, device=device))
        if t is None or t.numel() == 0:
            continue
        n = torch.linalg.vector_norm(t, p_norm, dtype=torch.promote_types(t.dtype, torch.float32))
        n = n.to(device, dtype)
        acc.copy_(torch.maximum(acc, n) if math.isinf(p_norm) else acc + n**p_norm)
    op = dist.ReduceOp.MAX if math.isinf(p_norm) else dist.ReduceOp.SUM
    total = torch.zeros((), dtype=dtype, device=device)
    for groups, acc in totals.items():
        for pg in groups:
            world = group_size(pg)
            if world > 1:
                with named_failures("clip_grad_norm_"):
                    dist.all_reduce(acc, op=op, group=pg)
                moved = 2 * (world - 1) * acc.element_size()
                record("all_reduce", moved, moved, world, "metadata", "grad norm", pg)
        total = torch.maximum(total, acc) if math.isinf(p_norm) else total + acc
    return total if math.isinf(p_norm) else total ** (1.0 / p_norm)


@torch.no_grad()
def clip_grad_norm_(
    model_or_params: nn.Module | Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale every gradient in place so that the dense model's gradient norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does on one device; returns that norm before clipping (see
    :func:`grad_norm`), the same on every rank.

    Call on every rank after ``backward()`` and ``odysseus.finalize_grads`` (``finalize_model_grads`` for a
    ``parallelize_llama`` model), before ``optimizer.step()``. Frozen parameters are left alone.
    ``error_if_nonfinite=True`` raises ``RuntimeError`` (on every rank) when the norm is NaN or Inf.
    """
    classified = _classify(model_or_params)
    total = _norm(classified, float(norm_type))
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is {total.item()}; "
            "set error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p, _, _ in classified:
        if p.grad is not None:
            g = p.grad.to_local() if is_dtensor(p.grad) else p.grad
            g.mul_(coef.to(g.device, g.dtype))
    return total
