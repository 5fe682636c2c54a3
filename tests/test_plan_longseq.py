"""The planner's long-sequence terms (odysseus.plan.longseq) against MemoryTracker on a stack of blocks with the
LM head and loss, and --max-seq against the memory model it searches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from odysseus import plan
from odysseus.plan import MODELS, Assumptions, LongSeq, get_hardware

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import longseq_memory  # noqa: E402


@pytest.mark.parametrize("world", [3])  # world 1 and 2: tests/test_perf_scripts.py (--quick)
def test_stack_peak_is_the_measured_peak(world):
    """Every option set and strategy at odd shapes (61 tokens over 3 ranks, 6 heads, a shared kv head, vocabulary
    251): the device peak within 5%, the offloaded host bytes exactly (verify raises otherwise)."""
    checked, rows = longseq_memory.verify([world], longseq_memory.QUICK_SHAPES)
    assert checked == world * 4 * len(longseq_memory.OPTIONS)
    assert {r["options"] for r in rows} == set(longseq_memory.OPTIONS)


def test_checkpoint_is_the_planner_recompute():
    """predict's recompute=True and LongSeq(checkpoint=True) are one model."""
    m, a = MODELS["llama3-8b"], Assumptions()
    case = plan.Case("odysseus", m.config(), 1, 65536, 8)
    assert plan.memory_bytes(m, case, a, True) == plan.memory_bytes(m, case, a, LongSeq(checkpoint=True))
    off = plan.memory_bytes(m, case, a, LongSeq(checkpoint=True, offload=True))
    assert off["host"] == 32 * plan.kept_input_bytes(case) and off["activations"] == plan.kept_input_bytes(case)


def test_max_seq_is_the_longest_length_that_fits():
    hw, a = get_hardware("h100-nvlink"), Assumptions()
    rows = plan.max_seq("llama3-8b", 4, hw, strategies=("tp-sp", "ulysses+zero3"))
    assert [r.strategy for r in rows] == sorted([r.strategy for r in rows], key=lambda s: -next(
        r.seq for r in rows if r.strategy == s))  # fmt: skip
    model = MODELS["llama3-8b"]
    for r in rows:
        assert r.seq > 0 and r.seq % 4 == 0
        for seq, fits in ((r.seq, True), (r.seq + 4, False)):
            case = plan.Case(r.strategy, model.config(), 1, seq, 4, 0, 2, r.save_input)
            mem = [plan.memory_bytes(model, case.at(k), a, r.options, "symm") for k in (0, 3)]
            ok = all(m["total"] <= hw.memory_bytes * a.usable_memory_fraction for m in mem)
            ok = ok and all(m["host"] <= hw.host_memory_bytes * a.host_usable_fraction for m in mem)
            assert ok == fits, (r.strategy, seq, r.options, r.binding)
        assert r.binding.startswith(("device memory", "host memory"))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="offload=True .* needs checkpoint=True"):
        LongSeq(offload=True)
    with pytest.raises(ValueError, match="ffn_tile=0 must be a positive"):
        LongSeq(ffn_tile=0)
    for argv, msg in (
        (["--seq", "4096", "--max-seq"], "--max-seq searches the sequence length: drop --seq 4096"),
        (["--seq", "4096", "--no-offload"], "--no-offload applies to --max-seq only"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "odysseus.plan", "--model", "llama3-8b", "--gpus", "8", *argv],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 2 and msg in done.stderr, done.stderr


def test_cli_max_seq_prints_every_strategy():
    out = subprocess.run(
        [sys.executable, "-m", "odysseus.plan", "--model", "llama3-8b", "--gpus", "8", "--max-seq", "--no-offload"],
        check=True, capture_output=True, text=True, timeout=120, cwd=ROOT,
    ).stdout  # fmt: skip
    for name in ("tp", "tp-sp", "ulysses", "odysseus", "ulysses+zero3", "odysseus+zero3"):
        assert f"| {name} |" in out
    assert "binding" in out and "offload no" in out
