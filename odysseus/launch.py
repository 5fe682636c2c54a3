"""Run a function on W gloo ranks in forked processes on one machine and collect what each returns.

For tests, the demo and CPU benchmarks; real jobs use ``torchrun``.

``run_ranks(world, fn, *args)`` calls ``fn(rank, world, *args)`` on every rank after
``init_process_group("gloo")``. A rank that raises fails the call with that rank's traceback; a rank
that does not finish within ``timeout`` seconds fails it with ``TimeoutError``. Every child is
killed before returning, so nothing is left running.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch._dynamo  # noqa: F401  # custom ops import it lazily (~2 s): once here rather than in every fork
import torch.distributed as dist


class RankError(AssertionError):
    """A rank raised; ``.rank`` and ``.remote_traceback`` say which and where."""

    def __init__(self, rank: int, tb: str):
        super().__init__(f"rank {rank} raised:\n{tb}")
        self.rank, self.remote_traceback = rank, tb


class _InitFailed(Exception):
    pass


def _child(rank, world, store, fn, args, kwargs, results, pg_timeout):
    torch.set_num_threads(1)
    try:
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"file://{store}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=pg_timeout),
            )
        except Exception:
            results.put((rank, "init", traceback.format_exc()))
            return
        out = fn(rank, world, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world: int,
    fn,
    *args,
    timeout: float = 120.0,
    pg_timeout: float | None = None,
    start_method: str = "fork",
    init_attempts: int = 3,
    **kwargs,
) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` ranks; return the results in rank order.

    ``pg_timeout`` bounds every collective (default: ``timeout``). ``start_method="spawn"`` is for CUDA,
    which cannot be used in forked children; ``fn`` must then be importable (a module-level function).
    Gloo's connection setup occasionally fails on a loaded machine; a failure inside
    ``init_process_group`` (before ``fn`` runs anywhere) starts fresh processes, up to ``init_attempts``.
    """
    failure = None
    for _ in range(init_attempts):
        try:
            return _launch(world, fn, args, kwargs, timeout, pg_timeout, start_method)
        except _InitFailed as err:
            failure = err
    rank, tb = failure.args
    raise RankError(rank, f"init_process_group failed {init_attempts} times; last:\n{tb}") from failure


def _launch(world, fn, args, kwargs, timeout, pg_timeout, start_method) -> list:
    ctx = mp.get_context(start_method)
    tmp = tempfile.mkdtemp(prefix="ody-ranks-")
    results = ctx.Queue()
    pg_timeout = pg_timeout if pg_timeout is not None else timeout
    procs = [
        ctx.Process(
            target=_child,
            args=(r, world, os.path.join(tmp, "store"), fn, args, kwargs, results, pg_timeout),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world:
            try:
                rank, status, payload = results.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world)) - set(got))
                    raise TimeoutError(f"ranks {missing} of {world} did not finish within {timeout}s") from None
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RankError(dead[0], f"process died with exit code {procs[dead[0]].exitcode}") from None
                continue
            if status == "init":
                raise _InitFailed(rank, payload)
            if status == "error":
                raise RankError(rank, payload)
            got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return [got[r] for r in range(world)]
