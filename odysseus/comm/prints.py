"""Fingerprints of the ranks' inputs, compared inside the length exchange the first module makes anyway.

A print is :data:`PRINT_LEN` host ints: ``[valid, trivial, h0, h1]``. ``h0, h1`` are the int64 bit patterns of
two fp64 sums over the tokens (plain, and weighted by position along the sequence), so equal inputs give
equal prints and a shard cut elsewhere almost surely does not. ``trivial`` marks a shard that may legitimately
repeat on every rank: fewer than :data:`MIN_TOKENS` tokens, or one token repeated (padding).

Reading a print must not make the host wait for the device. On the CPU there is nothing to wait for. On an
accelerator the sums are computed there, into a pinned host buffer with a non-blocking copy; the host reads a
call's print at the *next* call, by then long finished (``event.query()``; a print not ready yet is sent as
not valid, never waited for). Only the first call of each :class:`Fingerprinter` waits, once, so that a feed
that is wrong from the start raises at the first step. ``sync=True`` (``check_inputs=True``) always waits.
"""

from __future__ import annotations

import torch

PRINT_LEN = 4
MIN_TOKENS = 16
"""Shards shorter than this are never called identical on every rank (short shards can repeat by chance)."""
_ABSENT = -1.5  # what a missing tensor (position_ids=None, say) adds, so that None and a tensor differ


def _sums(t: torch.Tensor | None, seq_dim: int) -> torch.Tensor:
    """``[sum, position-weighted sum, one token repeated]`` of ``t`` in fp64, on ``t``'s device."""
    if t is None:
        return torch.tensor([_ABSENT, _ABSENT, 1.0], dtype=torch.float64)
    seq_dim = seq_dim if t.dim() > 1 else 0
    other = [d for d in range(t.dim()) if d != seq_dim]
    rows = t.sum(dim=other, dtype=torch.float64) if other else t.to(torch.float64)  # (L,): one value per token
    weights = torch.arange(1, rows.numel() + 1, device=rows.device, dtype=torch.float64)
    repeated = (rows == rows[:1]).all().to(torch.float64) if rows.numel() else rows.new_ones(())
    return torch.stack([rows.sum(), (rows * weights).sum(), repeated])


@torch.no_grad()  # a reading of the input, not part of the model: no graph, nothing saved for backward
def device_print(tensors: list[torch.Tensor | None], seq_dim: int = 1) -> torch.Tensor:
    """``[trivial, h0, h1]`` as int64 bit patterns (on the first tensor's device): one print of all ``tensors``,
    whose sequence sits at ``seq_dim``. Trivial: the first tensor has fewer than :data:`MIN_TOKENS` tokens or
    repeats one token."""
    first = tensors[0]
    device = first.device if first is not None else torch.device("cpu")
    parts = [_sums(t, seq_dim).to(device) for t in tensors]
    # Mixing the tensors' sums with distinct factors: deterministic, so equal inputs still give equal prints.
    h = sum(p[:2] * (k + 1.25) for k, p in enumerate(parts))
    short = first is None or first.shape[seq_dim if first.dim() > 1 else 0] < MIN_TOKENS
    trivial = torch.clamp(parts[0][2] + float(short), max=1.0)
    return torch.cat([trivial[None], h]).view(torch.int64)


class Fingerprinter:
    """Turns :func:`device_print` into host ints without waiting for the device (see the module docstring).

    One per place that checks (a module's region, a model's entry hook): consecutive calls pair up there."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self._pending: tuple[torch.Tensor, object] | None = None
        self._waited = False

    def __call__(self, tensors: list[torch.Tensor | None], seq_dim: int = 1) -> list[int]:
        """``[valid, trivial, h0, h1]``: this call's print, or on an accelerator the previous call's."""
        dev = device_print(tensors, seq_dim)
        if dev.device.type == "cpu":
            return [1, *dev.tolist()]
        if self.sync or not self._waited:
            self._waited = True
            return [1, *dev.tolist()]  # waits: every call with sync=True, else once, at the first call
        host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
        host.copy_(dev, non_blocking=True)
        event = torch.Event(dev.device)
        event.record()
        previous, self._pending = self._pending, (host, event)
        if previous is None or not previous[1].query():
            return [0] * PRINT_LEN
        return [1, *previous[0].tolist()]


def check_prints(prints: list[list[int]], lengths: list[int], replicated: bool, who: str, hint: str) -> None:
    """Raise where every rank's valid print contradicts the layout: different prints in a replicated (TP)
    region, or identical, non-trivial prints of equal lengths in a sequence-split one. ``hint``: how to turn
    the check off, for the message."""
    if not all(p[0] for p in prints):
        return
    keys = [tuple(p[2:]) for p in prints]
    same = len(set(keys)) == 1
    if replicated and not same:
        groups = sorted({tuple(r for r, k in enumerate(keys) if k == q) for q in keys})
        raise ValueError(
            f"{who}: the ranks hold different inputs (ranks grouped by equal input: {groups}); a "
            f"tensor-parallel ('tp') module takes the same whole sequence on every rank ({hint})"
        )
    if not replicated and same and len(set(lengths)) == 1 and not any(p[1] for p in prints):
        raise ValueError(
            f"{who}: every rank holds the same {lengths[0]} tokens; a sequence-split module takes each rank's "
            "odysseus.shard_sequence shard of the sequence, not the whole sequence on every rank "
            f"({hint})"
        )
