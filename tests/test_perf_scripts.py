"""The perf scripts run in their quick modes and produce their tables, plots, sections and traces; their
checks against the closed forms fail when a closed form is wrong."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multirank import RankError, run_ranks

from odysseus import overlap as ody_overlap
from odysseus.overlap import naive

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "perf"
sys.path.insert(0, str(PERF))

import bench_layer  # noqa: E402
import comm_volume  # noqa: E402
import common  # noqa: E402
import longseq_memory  # noqa: E402
import memory  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(PERF / script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _section(results: Path, name: str) -> str:
    text = results.read_text()
    assert text.startswith("# Measured results")
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    return text.split(begin)[1].split(end)[0]


@pytest.mark.parametrize("script, png", [("comm_volume.py", "comm_volume.png"), ("memory.py", "memory.png")])
def test_quick_mode_writes_table_plot_and_section(tmp_path, script, png):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\n<!-- begin other -->\nsomeone else's table\n<!-- end other -->\n")
    out = _run(script, "--quick", "--out", str(tmp_path), "--results", str(results))
    assert "Checked first:" in out and "matched the closed forms" in out
    for strategy in ("tp", "tp-sp", "ulysses", "odysseus", "ulysses+zero3", "odysseus+zero3"):
        for world in (2, 4, 8):
            assert f"| {strategy} | {world} |" in out
    assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    section = _section(results, script.removesuffix(".py"))
    assert "python perf/" in section and "cores" in section and "UTC" in section
    assert "someone else's table" in results.read_text()


def test_longseq_quick_mode_checks_and_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run("longseq_memory.py", "--quick", "--results", str(results))
    assert "Checked first:" in out and "Planner predictions, not GPU measurements" in out
    for option in longseq_memory.TABLE_OPTIONS:
        assert option in out
    assert "| ulysses+zero3 | 8 |" in _section(results, "longseq")


def test_longseq_check_fails_on_a_wrong_term(monkeypatch):
    real = longseq_memory.stack_peak

    def off(case, layers, vocab, opt, backend):  # 6% too much with the chunked loss only
        peak = real(case, layers, vocab, opt, backend)
        return dataclasses.replace(peak, bytes=round(peak.bytes * 1.06)) if opt.loss_chunk else peak

    monkeypatch.setattr(longseq_memory, "stack_peak", off)
    with pytest.raises(AssertionError, match=r"loss_chunk=16.*\+[56]\.\d% \(tolerance 5%\)"):
        longseq_memory.verify([1], longseq_memory.QUICK_SHAPES, longseq_memory.OPTIONS[4:5])


def test_memory_ring_check_fails_on_a_wrong_ring_term(monkeypatch):
    from odysseus.plan import memory as plan_memory

    real = plan_memory.ring_transients
    # The ring's backward transients 40% too small: the measured pure-ring peak must fall outside the tolerance.
    monkeypatch.setattr(plan_memory, "ring_transients", lambda case: (real(case)[0], round(real(case)[1] * 0.6)))
    with pytest.raises(AssertionError, match=r"at ring 2 x sp 1, rank 0, .*\(tolerance 5%\)"):
        memory.verify([], [], [(2, 1)], memory.RING_SHAPES[:1])


def test_sections_are_rewritten_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    common.write_section("a", "A-BODY-1", results)
    common.write_section("b", "B-BODY", results)
    common.write_section("a", "A-BODY-2", results)
    text = results.read_text()
    assert text.startswith("# Measured results") and "A-BODY-1" not in text
    assert text.index("A-BODY-2") < text.index("B-BODY") and text.count("<!-- begin a -->") == 1


def test_comm_volume_check_fails_on_a_wrong_closed_form(monkeypatch):
    real = comm_volume.strategy_records

    def off_by_one(*args, **kwargs):
        return [(ph, op, cat, b + (op == "all_to_all")) for ph, op, cat, b in real(*args, **kwargs)]

    monkeypatch.setattr(comm_volume, "strategy_records", off_by_one)
    with pytest.raises(AssertionError, match="library collectives differ.*ulysses"):
        comm_volume.verify([2], common.SHAPES[:1])


def test_comm_volume_check_fails_on_a_wrong_fsdp_form(monkeypatch):
    real = comm_volume.zero3_records
    monkeypatch.setattr(comm_volume, "zero3_records", lambda case, reshard: real(case, True))
    with pytest.raises(AssertionError, match="FSDP2 collectives differ.*zero3 keep"):
        comm_volume.verify([2], common.SHAPES[:1])


def test_memory_check_fails_on_a_wrong_closed_form(monkeypatch):
    real = memory.saved_activation_bytes
    monkeypatch.setattr(memory, "saved_activation_bytes", lambda case: real(case) + (case.variant.name == "odysseus"))
    with pytest.raises(AssertionError, match="odysseus at N=2.*'saved'"):
        memory.verify([2], common.SHAPES[:1])


def test_memory_check_fails_on_a_peak_beyond_the_tolerance(monkeypatch):
    real = memory.block_peak

    def off(case, backend):  # 6% too much for TP-SP keeping the shard on the naive backend only
        peak = real(case, backend)
        wrong = case.variant.name == "tp-sp" and case.save_input == "shard" and backend == "naive"
        return dataclasses.replace(peak, bytes=round(peak.bytes * 1.06)) if wrong else peak

    monkeypatch.setattr(memory, "block_peak", off)
    with pytest.raises(AssertionError, match=r"tp-sp at N=2, rank 0, shard/naive.*\+6\.0% \(tolerance 5%\)"):
        memory.verify([2], common.SHAPES[:1])


def _symm_resolves(rank: int, world: int) -> bool:
    try:
        ody_overlap.resolve_backend("symm", dist.group.WORLD, bench_layer._device())
    except RuntimeError:
        return False
    return True


def symm_runs_here() -> bool:
    """Whether bench_layer's forked ranks can use the symm backend on this machine: what
    ``odysseus.overlap.resolve_backend`` answers on the same kind of group and device (the benchmark skips
    symm exactly when it refuses). Spawned ranks where CUDA exists: a forked child cannot use CUDA once
    this process has."""
    start = "spawn" if torch.cuda.is_available() else "fork"
    return all(run_ranks(2, _symm_resolves, start_method=start))


def test_bench_layer_times_traces_and_skips(tmp_path):
    out, results = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    text = _run(
        "bench_layer.py", "--local-world", "2", "--strategies", "tp,odysseus,ulysses+zero3",
        "--backends", "naive,pipelined,symm", "--hidden", "64", "--heads", "4", "--ffn", "128", "--seqs", "32",
        "--warmup", "1", "--repeats", "2", "--trace-dir", str(tmp_path / "traces"), "--json", str(out),
        "--results", str(results),
    )  # fmt: skip
    run = json.loads(out.read_text())
    rows = {(r["strategy"], r["backend"]): r for r in run["results"]}
    assert set(rows) == {("tp", "n/a"), ("ulysses+zero3", "n/a")} | {
        ("odysseus", b) for b in ("naive", "pipelined", "symm")
    }
    # Only a backend that cannot run here may be skipped, and then with its reason; every other row ran.
    symm = symm_runs_here()
    for key, row in rows.items():
        if key[1] == "symm" and not symm:
            assert row["status"] == "skipped" and row["reason"], row
            assert "| 32 | odysseus | symm | skipped |" in text
            continue
        assert row["status"] == "ok", (key, row)
        assert row["median_s"] > 0 and len(row["times_s"]) == 2
        assert Path(row["trace"]).exists()
        assert set(bench_layer.expected_ranges(key[0])) <= set(row["ranges_found"]), (key, row["ranges_found"])
        assert any(c.startswith("c10d::") for c in row["collectives_found"]), row["collectives_found"]
    assert "time / fastest" in text
    assert "Layer step time" in _section(results, "bench_layer")


def test_bench_layer_fails_when_a_step_raises(tmp_path, monkeypatch):
    # A backend that raises must end the run with an error naming the configuration, not become a
    # "skipped" row. The forked ranks inherit the patched naive backend.
    def broken(*args, **kwargs):
        raise RuntimeError("planted naive failure")

    monkeypatch.setattr(naive, "ag_matmul", broken)
    out = tmp_path / "bench.json"
    with pytest.raises(RankError) as err:
        bench_layer.main(
            ["--local-world", "2", "--strategies", "tp,odysseus", "--backends", "pipelined,naive", "--hidden", "64",
             "--heads", "4", "--ffn", "128", "--seqs", "32", "--warmup", "0", "--repeats", "1", "--trace-dir", "",
             "--json", str(out)]
        )  # fmt: skip
    assert "odysseus / naive / L=32: the first step failed" in str(err.value)
    assert "planted naive failure" in str(err.value)
    assert not out.exists()


def test_bench_layer_times_the_input_check_against_none(tmp_path):
    out = tmp_path / "bench.json"
    run = bench_layer.main(
        ["--local-world", "2", "--strategies", "tp,odysseus", "--backends", "naive", "--hidden", "64", "--heads",
         "4", "--ffn", "128", "--seqs", "32", "--warmup", "0", "--repeats", "2", "--trace-dir", "",
         "--input-checks", "default,off", "--json", str(out)]
    )  # fmt: skip
    rows = {(r["strategy"], r["check"]): r for r in run["results"]}
    assert set(rows) == {(s, c) for s in ("tp", "odysseus") for c in ("default", "off")}
    assert all(r["status"] == "ok" and 0 < r["check_alone_s"] < r["median_s"] for r in rows.values())
    text = bench_layer.report(run)
    assert "Default input check against none" in text and "(input check: off)" in text
