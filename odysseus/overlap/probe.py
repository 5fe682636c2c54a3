"""Whether ``symm`` works on a group: every rank on one host, then one small call of each op against ``naive``,
agreed by every rank.

Symmetric memory maps the peers' buffers over NVLink: a group whose ranks span hosts (nodes; see
:mod:`odysseus.comm.hosts`) takes ``pipelined`` (NCCL) without trying, and without a warning, as that is
what such a group is for. ``auto`` must never crash where ``pipelined`` works. So before it picks ``symm``
for a group, every rank runs a tiny ``ag_matmul`` and ``matmul_rs`` through ``symm`` and through ``naive``
and compares them; the ranks then exchange their verdicts, so all of them choose the same backend. A
failure (an exception, or results that disagree) makes ``auto`` warn once, naming the rank and the reason,
and use ``pipelined``.
An explicit ``backend="symm"`` skips the probe and raises whatever goes wrong.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..comm.groups import group_rank, group_size, meta_group
from ..comm.hosts import group_hosts
from ..comm.sizes import shard_sizes

_VERDICTS: dict[tuple, str | None] = {}


def _problem(pg, device: torch.device, dtype: torch.dtype):
    world, rank = group_size(pg), group_rank(pg)
    sizes = shard_sizes(8 * world + 1, world)  # uneven on purpose
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(2, sizes[rank], 32, generator=g)
    w = torch.randn(32, 24, generator=g)
    xr = torch.randn(2, sum(sizes), 24, generator=g)
    wr = torch.randn(24, 40, generator=g)
    return sizes, *(t.to(device, dtype) for t in (x, w, xr, wr))


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def _agree(pg, verdict: str | None) -> str | None:
    """Every rank's verdict gathered on every rank: the first failure (``"rank r: reason"``), or None."""
    verdicts: list[str | None] = [None] * group_size(pg)
    dist.all_gather_object(verdicts, verdict, group=meta_group(pg))
    failed = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    return None if not failed else f"rank {failed[0][0]}: {failed[0][1]}"


def _try_symm(pg, device: torch.device, dtype: torch.dtype) -> str | None:
    """The agreed verdict: None if symm matches naive on a small problem on every rank, else the reason.

    Two rounds, each closed by an agreement, so a rank that cannot set up symmetric memory at all does not
    leave its peers waiting for it in a collective: first the local checks and peer access between every
    pair of the group's devices (exchanged first), then the calls (which allocate and rendezvous
    collectively).
    """
    from . import naive, symm

    sizes, x, w, xr, wr = _problem(pg, device, dtype)
    try:
        engine = symm.transport_for(device)
        mine = engine.device_id()
        verdict = None
    except Exception as err:  # noqa: BLE001 - any failure means "do not use symm", with its reason
        engine, mine, verdict = None, -1, _reason(err)
    devices: list[int] = [-1] * group_size(pg)  # every rank's device, for the peer-access check
    dist.all_gather_object(devices, mine, group=meta_group(pg))
    try:
        if engine is not None:  # a rank without a transport (-1) reports its own failure
            engine.preflight([d for d in devices if d >= 0])
    except Exception as err:  # noqa: BLE001 - any failure means "do not use symm", with its reason
        verdict = _reason(err)
    verdict = _agree(pg, verdict)
    if verdict is not None:
        return verdict
    try:
        got = [symm.ag_matmul(x, w, sizes, pg)[0], symm.matmul_rs(xr, wr, sizes, pg)]
        symm.check()
        want = [naive.ag_matmul(x, w, sizes, pg)[0], naive.matmul_rs(xr, wr, sizes, pg)]
        for name, a, b in zip(("ag_matmul", "matmul_rs"), got, want):
            # Both sides round to the same dtype: 16-bit results agree to a few units of bf16's 2**-8; tf32
            # products (if enabled) stay well inside that at K <= 40.
            err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
            if not err < 3e-2:
                verdict = f"{name} differs from naive by {err:.3g} (relative)"
                break
    except Exception as err:  # noqa: BLE001
        verdict = _reason(err)
    return _agree(pg, verdict)


def symm_works(pg, device: torch.device, dtype: torch.dtype) -> bool:
    """Collective, once per (group, device, dtype): whether ``auto`` may use ``symm``; warns once if it fails
    (not for a group that spans hosts, which never tries it: the host names are exchanged once per group)."""
    key = (pg.group_name, device, dtype)
    hosts = group_hosts(pg)
    if len(set(hosts)) > 1:
        return False
    if key not in _VERDICTS:
        _VERDICTS[key] = _try_symm(pg, device, dtype)
        if _VERDICTS[key] is not None:
            warnings.warn(
                f"odysseus: backend 'auto' uses 'pipelined' on group {pg.group_name} ({device}, {dtype}): a "
                f"first 'symm' call failed on {_VERDICTS[key]}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _VERDICTS[key] is None
