"""Input checks shared by every module; each error names the bad value and what was expected."""

from __future__ import annotations

import torch


def check_input(x: torch.Tensor, weight: torch.Tensor, hidden_size: int, who: str) -> None:
    """Check ``x: (batch, seq, hidden)`` against a module's weight: rank, width, dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{who}: expected x of shape (batch, seq, hidden), got {x.dim()} dims {tuple(x.shape)}")
    if x.shape[-1] != hidden_size:
        raise ValueError(f"{who}: expected hidden size {hidden_size}, got x.shape[-1]={x.shape[-1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{who}: input dtype {x.dtype} does not match weight dtype {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{who}: input is on {x.device} but the weights are on {weight.device}")


def normalize_position_ids(
    position_ids: torch.Tensor | None, batch: int, seq: int, offset: int, device: torch.device
) -> torch.Tensor:
    """Return int64 positions of shape ``(batch or 1, seq)``.

    ``None`` gives ``offset .. offset+seq-1`` (a shard's true global positions); a given tensor must be
    ``(seq,)``, ``(1, seq)`` or ``(batch, seq)`` where seq is the length of the input it goes with.
    """
    if position_ids is None:
        return torch.arange(offset, offset + seq, device=device)[None]
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids of shape {tuple(position_ids.shape)} do not match the input: "
            f"expected ({seq},), (1, {seq}) or ({batch}, {seq})"
        )
    if position_ids.device != device:
        raise ValueError(f"position_ids are on {position_ids.device} but the input is on {device}")
    return position_ids.long()


def check_finite_here(x: torch.Tensor, who: str, rank: int) -> None:
    """Reject NaN/Inf in ``x`` on this rank (``check_finite=True`` where no exchange carries the verdict)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: the input holds NaN or Inf on rank {rank} (check_finite=True)")
