"""The multi-rank runner itself: results, a rank that raises, a rank that hangs."""

import os
import time

import pytest
import torch.distributed as dist
from multirank import RankError, run_ranks


def _pid(rank, world):
    dist.barrier()
    return rank, world, os.getpid()


def _raise_on_one(rank, world):
    if rank == 1:
        raise KeyError("rank one fails here")
    dist.barrier()


def _hang(rank, world):
    time.sleep(60)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_results_in_rank_order(world):
    got = run_ranks(world, _pid)
    assert [g[:2] for g in got] == [(r, world) for r in range(world)]
    assert len({g[2] for g in got}) == world


def test_a_raising_rank_fails_with_its_traceback():
    with pytest.raises(RankError) as info:
        run_ranks(3, _raise_on_one, timeout=30, pg_timeout=5)
    assert info.value.rank == 1
    assert "rank one fails here" in str(info.value) and "_raise_on_one" in str(info.value)


def test_a_hung_rank_times_out_and_is_killed():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 1.5s"):
        run_ranks(2, _hang, timeout=1.5)
    assert time.monotonic() - t0 < 10
