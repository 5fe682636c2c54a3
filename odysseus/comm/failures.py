"""Turn a peer's failure into an error that names it, instead of a bare timeout or a hang.

A rank that raises inside :func:`fail_fast` records its rank and error in the process group's store
before the exception leaves. Its peers are blocked in a collective until the process group's timeout
(``init_process_group(timeout=...)``) or a closed connection ends it; every collective the library
issues runs under :func:`named_failures`, which then looks in the store and raises :class:`PeerFailure`
naming the rank that failed first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

_KEY = "odysseus/failed/{}"


class PeerFailure(RuntimeError):
    """A collective failed because another rank failed first; ``.rank`` is that rank (global)."""

    def __init__(self, rank: int, reason: str, op: str):
        super().__init__(f"{op}: rank {rank} failed first ({reason}); this rank's collective was abandoned")
        self.rank, self.reason = rank, reason


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


@contextmanager
def fail_fast() -> Iterator[None]:
    """Wrap a training step on every rank: an exception here is published to the peers, then re-raised."""
    try:
        yield
    except PeerFailure:
        raise  # a consequence, not a cause: publishing it would hide the rank that failed first
    except BaseException as err:
        store = _store() if dist.is_initialized() else None
        if store is not None:
            try:
                store.set(_KEY.format(dist.get_rank()), f"{type(err).__name__}: {err}"[:500])
            except Exception:  # noqa: BLE001 - the original error matters more than a failed report
                pass
        raise


def failed_peers() -> list[tuple[int, str]]:
    """``(rank, reason)`` of every rank that published a failure, in rank order."""
    store = _store() if dist.is_initialized() else None
    if store is None:
        return []
    out = []
    for r in range(dist.get_world_size()):
        key = _KEY.format(r)
        try:
            if store.check([key]):
                out.append((r, store.get(key).decode()))
        except Exception:  # noqa: BLE001 - a store that went away with its host tells us nothing
            return out
    return out


@contextmanager
def named_failures(op: str, grace_s: float = 2.0) -> Iterator[None]:
    """Run a collective; if it fails and a peer published a failure, raise :class:`PeerFailure` instead.

    ``grace_s``: how long to look for the report, since a closed connection can beat the store write.
    """
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as err:  # what gloo/NCCL raise on a timeout or a closed peer connection
        deadline = time.monotonic() + grace_s
        while True:
            peers = failed_peers()
            if peers:
                rank, reason = peers[0]
                raise PeerFailure(rank, reason, op) from err
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
