"""What the interpreter emulates of a GPU (odykernels/_interpret.py, the TMA prefetch of ag_matmul), tested.

* programs run in a seeded random order, different seeds give different orders, ``None`` gives index order;
* the ``USE_CLOCK`` wait runs on the CPU against the host clock, and a deadline of T µs fires between T
  and 2T (a unit error of 1000x either way fails);
* ag_matmul's flag lookahead comes from one helper, and the launched value covers the pipeline.
"""

from __future__ import annotations

import time

import pytest
import torch
import triton
import triton.language as tl

from odykernels import _interpret
from odykernels._runtime import launchable
from odykernels.ag_matmul import lookahead, prepare_ag_matmul
from odykernels.matmul import INTERPRETER_CONFIG, SM80_CONFIGS, SM90_CONFIGS
from odykernels.signal import FLAG_DTYPE, new_status, read_status, wait_flag, wait_flag_for_tma
from odykernels.testing import program_order

CPU = torch.device("cpu")


@triton.jit
def _order_kernel(out_ptr, counter_ptr):
    # Each program takes the next free slot and writes its index there: out = the order programs ran in.
    slot = tl.atomic_add(counter_ptr, 1)
    tl.store(out_ptr + slot, tl.program_id(0))


@triton.jit
def _deadline_kernel(flag_ptr, status_ptr, ok_ptr, expected, budget, FOR_TMA: tl.constexpr):
    if FOR_TMA:
        ok = wait_flag_for_tma(flag_ptr, expected, budget, status_ptr, 0, 0, True)
    else:
        ok = wait_flag(flag_ptr, expected, budget, status_ptr, 0, 0, True)
    tl.store(ok_ptr, ok.to(tl.int32))


def _run_order(programs: int) -> list[int]:
    out = torch.full((programs,), -1, dtype=torch.int32)
    counter = torch.zeros(1, dtype=torch.int32)
    launchable(_order_kernel, CPU)[(programs,)](out, counter)
    return out.tolist()


def test_programs_run_in_seeded_random_order():
    with program_order(None):
        assert _run_order(6) == list(range(6))
    runs = {}
    for seed in (0, 1, 2):
        with program_order(seed):
            runs[seed] = [_run_order(6), _run_order(6)]
        with program_order(seed):
            assert _run_order(6) == runs[seed][0], f"seed {seed}: not reproducible"
    for seed, (first, second) in runs.items():
        assert sorted(first) == list(range(6)), f"seed {seed}: {first} is not a permutation"
        assert first != second, f"seed {seed}: two launches ran in the same order {first}"
    firsts = {tuple(r[0]) for r in runs.values()}
    assert len(firsts) == 3 and list(range(6)) not in [r[0] for r in runs.values()], runs


def _deadline(budget_us: int, for_tma: bool) -> float:
    flag = torch.zeros(1, dtype=FLAG_DTYPE)  # never set: the wait must give up at its deadline
    status, ok = new_status(CPU), torch.ones(1, dtype=torch.int32)
    start = time.monotonic()
    launchable(_deadline_kernel, CPU)[(1,)](flag, status, ok, 1, budget_us, FOR_TMA=for_tma)
    elapsed = time.monotonic() - start
    assert ok.item() == 0 and read_status(status)[:3] == [1, 0, 1], read_status(status)
    return elapsed


@pytest.mark.parametrize("for_tma", [False, True], ids=["wait_flag", "wait_flag_for_tma"])
def test_gpu_timer_deadline_fires_between_t_and_2t(for_tma):
    """USE_CLOCK=True under the interpreter: the host clock stands in for %globaltimer (ns), the budget is µs;
    for the TMA path's wait, its inline-PTX spin runs as a host loop. T = 0.3 s: long next to a launch's
    set-up, so a 2 T bound holds on a loaded 2-core machine, and a unit error (budget read as ns or ms)
    lands 1000x outside [T, 2T]."""
    _deadline(1, for_tma)  # set-up (twins, first launch) outside the timing
    T = 0.3
    elapsed = _deadline(int(T * 1e6), for_tma)
    assert T <= elapsed < 2 * T, f"a {T} s deadline fired after {elapsed:.4f} s"


def test_lookahead_covers_the_pipeline():
    """The launched LOOKAHEAD is at least num_stages (the pipeline issues loads num_stages - 1 steps ahead)."""
    for cfg in (INTERPRETER_CONFIG, *(c for t in (SM80_CONFIGS, SM90_CONFIGS) for cs in t.values() for c in cs)):
        assert lookahead(cfg) >= cfg.num_stages, cfg
    a, b = torch.randn(61, 24), torch.randn(24, 40)
    flags = torch.ones(3, dtype=FLAG_DTYPE)
    launch = prepare_ag_matmul(a, b, [21, 20, 20], 0, flags, 1, path="tma")
    kw = launch.kwargs
    assert kw["LOOKAHEAD"] >= kw["num_stages"] == INTERPRETER_CONFIG.num_stages, kw
    # Under the interpreter the TMA loads are issued num_stages - 1 steps early, like the compiled pipeline's.
    assert kw["PREFETCH"] == kw["num_stages"] - 1, kw


def test_program_order_seed_from_env(monkeypatch):
    monkeypatch.setenv(_interpret.ORDER_SEED_ENV, "index")
    _interpret.program_order_seed_from_env()
    try:
        assert _run_order(6) == list(range(6))
        monkeypatch.setenv(_interpret.ORDER_SEED_ENV, "nope")
        with pytest.raises(ValueError, match="ODYSSEUS_PROGRAM_ORDER_SEED='nope': expected an integer seed or 'index'"):
            _interpret.program_order_seed_from_env()
    finally:
        monkeypatch.delenv(_interpret.ORDER_SEED_ENV)
        _interpret.program_order_seed_from_env()
