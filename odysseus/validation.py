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


def check_not_in_ddp(pg, who: str) -> None:
    """Refuse to run inside ``DistributedDataParallel`` over ranks of this module's own group.

    DDP broadcasts rank 0's parameters when it is built and averages gradients over its group: over the
    ranks of a sequence- or tensor-parallel group, which hold different weight shards or different tokens,
    that overwrites every other rank's shards with rank 0's (silently wrong logits) and mixes gradients.
    DDP's own marker of the module it is running (``_active_ddp_module``, set during its forward) is read.
    """
    if pg is None:
        return
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
    if ddp is None or getattr(ddp, "process_group", None) is None:
        return
    import torch.distributed as dist

    ours = dist.get_process_group_ranks(pg)
    shared = sorted(set(dist.get_process_group_ranks(ddp.process_group)) & set(ours))
    if len(shared) > 1:
        raise ValueError(
            f"{who}: the model runs inside DistributedDataParallel over a group sharing ranks {shared} with its "
            f"own sequence/tensor-parallel group {sorted(ours)}. DDP broadcast rank 0's weight shards to those "
            "ranks when it was built (their weights are now wrong) and would average gradients of different "
            "shards. For data parallelism across copies of the split model use a 2-D DeviceMesh: "
            "mesh = init_device_mesh(device, (dp, sp), mesh_dim_names=('dp', 'sp')); parallelize over mesh['sp'] "
            "and wrap in DDP(model, process_group=mesh['dp'].get_group()). Without data parallelism drop DDP: "
            "odysseus.finalize_grads (finalize_model_grads) syncs the gradients"
        )
