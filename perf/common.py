"""Helpers the perf scripts share: import path, machine line, markdown tables, RESULTS.md sections.

Importing this module puts the repository root on ``sys.path`` (the scripts run as ``python perf/x.py``
or under ``torchrun``, where only ``perf/`` is on the path).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from odysseus.strategies.registry import SPECS, Variant  # noqa: E402

RESULTS = ROOT / "perf" / "RESULTS.md"
# Small Llama-like shapes at which the perf scripts measure before extrapolating (config kwargs, batch,
# sequence): multi-head like Llama-2-7B (i/d = 2.69), a wider head with batch 2, more heads than ranks,
# GQA with kv heads shared between ranks at N = 8, and GQA whose uneven head split makes a rank's query
# heads read its kv heads unevenly at N = 4 (expanded kv). Sequences include ones no world size divides.
SHAPES: list[tuple[dict, int, int]] = [
    (dict(hidden_size=64, num_heads=8, intermediate_size=172), 1, 32),
    (dict(hidden_size=96, num_heads=8, intermediate_size=258), 2, 27),
    (dict(hidden_size=64, num_heads=16, intermediate_size=172), 1, 50),
    (dict(hidden_size=64, num_heads=8, num_kv_heads=2, intermediate_size=172), 1, 43),
    (dict(hidden_size=80, num_heads=10, num_kv_heads=2, intermediate_size=216), 1, 37),
]


def style(variant: Variant) -> dict:
    """Plot style of a strategy: one colour per strategy (registry order), dashed with triangles for its
    ZeRO-3 variant. TP (the one strategy that does not split the sequence) moves the same bytes as TP-SP, so
    it is drawn dotted on top of it."""
    colour = f"C{SPECS.index(variant.spec)}"
    if variant.zero3:
        return dict(color=colour, ls="--", marker="^", ms=3)
    if not variant.spec.sequence_split:
        return dict(color=colour, ls=":", lw=2.5, marker="s", ms=3, zorder=3)
    return dict(color=colour, ls="-", marker="o", ms=3)


_HEADER = """# Measured results

Each section holds one table with the command that made it, the machine and the date. Sections are
rewritten in place by the script named in them; other sections are left alone.
"""


def machine() -> str:
    """One line naming the machine: CPU model and cores (and GPU, if any), OS, torch version."""
    cpu, vm = platform.processor() or platform.machine(), False
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            vm = vm or " hypervisor" in line  # the CPU flag a guest sees under a hypervisor
    parts = [f"{cpu}, {os.cpu_count()} cores{' (VM)' if vm else ''}"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    parts.append(f"{platform.system()} {platform.release()}, torch {torch.__version__}")
    return "; ".join(parts)


def today() -> str:
    """The date and time in UTC, as the RESULTS sections record it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command that is running, as a user would type it again."""
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; every row must have as many cells as ``headers``."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells, expected {len(headers)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(section: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the block between this section's markers in ``path``, leaving the rest as is.

    The file is created with a short header if absent; the write is atomic (rename), so a reader never
    sees half a file.
    """
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    text = path.read_text() if path.exists() else _HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp's 0600 would hide it from others
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


NORM_CHUNK_ROWS = 16
"""RMSNorm chunk (rows) while measuring peaks: smaller than a shard, as at the lengths the planner
extrapolates to (``odysseus.layout.RMSNORM_CHUNK_ROWS`` is 4096), so that the chunked path is the one measured."""


@contextlib.contextmanager
def norm_chunks(rows: int):
    """Run the fused RMSNorm (and the planner's form of its backward) in chunks of ``rows`` rows: forked
    ranks inherit it; the previous value comes back for the extrapolation."""
    from odysseus import layout

    before, layout.RMSNORM_CHUNK_ROWS = layout.RMSNORM_CHUNK_ROWS, rows
    try:
        yield
    finally:
        layout.RMSNORM_CHUNK_ROWS = before


def peak_deviation(
    where: str, measured: int, model: int, moment: str, op: str, tolerance: float, detail: str = ""
) -> float:
    """``model / measured - 1`` for a peak the closed forms predict; raise naming the case past ``tolerance``."""
    dev = model / measured - 1
    if abs(dev) > tolerance:
        raise AssertionError(
            f"{where}: measured peak {measured} bytes at {op}, closed form {model} ({moment}): {dev:+.1%} "
            f"(tolerance {tolerance:.0%}){detail}"
        )
    return dev


def parse_ints(text: str, what: str) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]``; a clear error for anything else (sizes such as ``4K`` or ``64k`` allowed)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        mult = 1024 if item[-1:].lower() == "k" else 1
        try:
            value = int(item[:-1] if mult > 1 else item) * mult
        except ValueError:
            raise ValueError(f"--{what}: {item!r} is not an integer (e.g. 2,4,8 or 4K,16K)") from None
        if value < 1:
            raise ValueError(f"--{what}: {value} must be positive")
        out.append(value)
    return out


def sweep_args(description: str, argv: list[str] | None, models: Sequence[str]) -> argparse.Namespace:
    """Arguments of the scripts that check small shapes, then extrapolate: model, worlds, sequences, quick.

    Adds ``worlds``/``seqs`` as int lists, ``shapes`` (the small shapes checked) and ``check_worlds``.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b", choices=sorted(models))
    p.add_argument("--worlds", default="2,4,8", help="world sizes N")
    p.add_argument("--seqs", default="4K,16K,64K", help="sequence lengths of the full-size table")
    p.add_argument("--quick", action="store_true", help="check N=2,4 on two small shapes only (for tests)")
    p.add_argument("--out", type=Path, default=ROOT / "perf", help="directory of the PNG")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    args = p.parse_args(argv)
    args.worlds, args.seqs = parse_ints(args.worlds, "worlds"), parse_ints(args.seqs, "seqs")
    args.shapes = SHAPES[:2] if args.quick else SHAPES
    args.check_worlds = [w for w in args.worlds if w <= 4] if args.quick else args.worlds
    return args
