"""The same dense weights on every rank, checked once at setup: each rank takes its share of the dense model it
holds, so a model built on each rank from its own seed (``torch.manual_seed(100 + rank)``) would otherwise
train a mix of shards that matches no dense model, without an error."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from .failures import named_failures
from .groups import group_size, meta_group
from .mesh import flat_group, resolve_mesh


def weight_print(w: torch.Tensor) -> torch.Tensor:
    """``[sum, row-weighted sum]`` of ``w`` in fp64, on ``w``'s device (zeros for a meta tensor: nothing to read)."""
    if w.device.type == "meta":
        return torch.zeros(2, dtype=torch.float64)
    w = w.detach()
    rows = w.reshape(w.shape[0], -1).sum(1, dtype=torch.float64) if w.dim() > 1 else w.to(torch.float64).reshape(-1)
    weights = torch.arange(1, rows.numel() + 1, device=rows.device, dtype=torch.float64)
    return torch.stack([rows.sum(), (rows * weights).sum()])


def whole_model_group(group) -> dist.ProcessGroup | None:
    """The group of every rank that holds a share or a replica of the model built over ``group`` (any form
    :func:`~.mesh.resolve_mesh` takes): the ranks the sequence is split over (sp, or ring x sp), or with data
    parallelism every rank of the mesh (collective the first time)."""
    mesh = resolve_mesh(group)
    return flat_group(mesh) if mesh.data_parallel else mesh.seq


def check_same_weights(named: Iterable[tuple[str, torch.Tensor]], pg: dist.ProcessGroup | None, who: str) -> None:
    """Raise ``ValueError`` on every rank of ``pg`` unless every rank holds the same ``named`` tensors (by a
    fingerprint each), naming the first that differs and which ranks agree. One collective (an object
    all-gather on the gloo twin of ``pg``); a no-op on one rank."""
    world = group_size(pg)
    if world == 1:
        return
    named = list(named)
    names = [n for n, _ in named]
    # Read on the host at setup only: a wait for the device here costs nothing per step.
    prints = [weight_print(t).cpu().view(torch.int64).tolist() for _, t in named]
    every: list = [None] * world
    with named_failures(f"{who}: weight check"):
        dist.all_gather_object(every, (names, prints), group=meta_group(pg))
    if len({tuple(n) for n, _ in every}) > 1:
        sizes = [len(n) for n, _ in every]
        raise ValueError(f"{who}: the ranks hold different models (numbers of weights by rank: {sizes})")
    for i, name in enumerate(names):
        values = [tuple(p[i]) for _, p in every]
        if len(set(values)) > 1:
            groups = sorted({tuple(r for r, v in enumerate(values) if v == q) for q in values})
            raise ValueError(
                f"{who}: the ranks hold different weights; the first that differs is {name!r} (ranks grouped by "
                f"equal value: {groups}). Every rank must take its share of the same dense model: seed every rank "
                "alike (not torch.manual_seed(seed + rank)) or load the same checkpoint on each; "
                "check_weights=False skips this check"
            )
