"""Fit the time model to a measured ``perf/bench_layer.py`` run: seconds per flop, per byte of each
collective kind and per collective (:func:`calibrate`), and the measured-against-predicted report.

``python -m odysseus.plan --calibrate run.json`` prints the report and plans with the fitted values.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field

import torch

from ..config import TransformerConfig
from ..strategies.registry import Variant
from .case import Case
from .cost import block_cost
from .forms import strategy_records
from .presets import Assumptions, Hardware

_UNRESOLVED = 1e30
"""Rate or bandwidth given to a term the fit put no weight on."""

_KINDS = {"all_gather": "ag/rs", "reduce_scatter": "ag/rs", "all_to_all": "all_to_all", "all_reduce": "all_reduce"}
"""Collective kinds the calibration gives a bandwidth each. All-gather and reduce-scatter always come in
equal bytes in these strategies, so one run cannot tell them apart: they share one."""
_GROUPS = ("ag/rs", "all_to_all", "all_reduce")


@dataclass(frozen=True)
class Calibration:
    """Rate, bandwidth per collective kind and per-collective latency, fitted to a ``bench_layer.py`` run."""

    flops_per_s: float
    bytes_per_s: dict[str, float]
    """Per kind in :data:`_GROUPS`; ``_UNRESOLVED`` where the run gave that term no weight."""
    latency_s: float
    source: str
    residual: float
    """Root mean square of (predicted - measured) / measured over the fitted rows."""
    rows: list[dict] = field(default_factory=list)
    """The measured rows with their predicted time added (``predicted_s``)."""

    def hardware(self) -> Hardware:
        """A :class:`Hardware` whose peaks are the fitted values (one node of the bench's world size).

        Its link bandwidth is the fastest fitted kind; :meth:`assumptions` scales the others down.
        """
        world = max((r["world"] for r in self.rows), default=1)
        src = f"fitted by odysseus.plan.calibrate from {self.source}"
        return Hardware(
            name="calibrated",
            description=f"fitted to {self.source}",
            peak_flops=self.flops_per_s,
            memory_bytes=max((r.get("memory_bytes", 0) for r in self.rows), default=0) or 1e18,
            intra_node_bw=max(self.bytes_per_s.values()),
            gpus_per_node=world,
            sources={
                "peak_flops": src,
                "memory_bytes": f"{self.source}: host memory per rank recorded by the bench",
                "intra_node_bw": src,
                "gpus_per_node": f"{self.source}: world size of the run",
            },
        )

    def assumptions(self) -> Assumptions:
        """Efficiencies of 1 (folded into the fitted rates), the fitted latency and per-kind bandwidth
        ratios, no overlap (the fit uses the naive backend)."""
        base = Assumptions()
        src = f"fitted by odysseus.plan.calibrate from {self.source}"
        fastest = max(self.bytes_per_s.values())
        return dataclasses.replace(
            base,
            gemm_efficiency=1.0,
            attention_efficiency=1.0,
            link_efficiency=1.0,
            collective_latency_s=self.latency_s,
            host_exchange_latency_s=self.latency_s,
            collective_efficiency={k: self.bytes_per_s[g] / fastest for k, g in _KINDS.items()},
            sources={
                **base.sources,
                **{k: f"1: {src}" for k in ("gemm_efficiency", "attention_efficiency", "link_efficiency")},
                "collective_latency_s": src,
                "host_exchange_latency_s": src,
                "collective_efficiency": src,
            },
        )


def _features(row: dict) -> list[float]:
    """Flops, bytes received per kind in :data:`_GROUPS`, and latency units of one bench row.

    Latency units count one per collective (two per all-reduce) and one per length exchange: the time
    :func:`block_cost` gives when rate and bandwidth are infinite and every latency is 1 s.
    """
    cfg = TransformerConfig(**row["config"])
    names = ("peak_flops", "memory_bytes", "intra_node_bw", "gpus_per_node")
    probe_hw = Hardware("probe", 1e300, 1.0, 1e300, row["world"], sources=dict.fromkeys(names, "probe"))
    ones = dataclasses.replace(
        Assumptions(),
        gemm_efficiency=1.0,
        attention_efficiency=1.0,
        link_efficiency=1.0,
        collective_latency_s=1.0,
        host_exchange_latency_s=1.0,
    )
    case = Case(row["strategy"], cfg, row["batch"], row["seq"], row["world"], 0, row["dtype_bytes"])
    latency = block_cost(case, probe_hw, ones, "naive")
    by_kind = dict.fromkeys(_GROUPS, 0.0)
    for _, op, _, nbytes in strategy_records(case):
        by_kind[_KINDS[op]] += nbytes
    k = row["layers"]
    return [k * latency.flops, *(k * by_kind[g] for g in _GROUPS), k * latency.time_s]


def _nonneg_lstsq(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least squares with x >= 0 for a handful of unknowns: the best solution over every active set."""
    best, best_err = torch.zeros(A.shape[1], dtype=A.dtype), float(b.square().sum())
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            sol = torch.linalg.lstsq(A[:, cols], b[:, None]).solution[:, 0]
            if (sol < 0).any():
                continue
            x = torch.zeros(A.shape[1], dtype=A.dtype)
            x[list(cols)] = sol
            err = float((A @ x - b).square().sum())
            if err < best_err:
                best, best_err = x, err
    return best


def calibrate(bench: str | dict) -> Calibration:
    """Fit seconds per flop, per byte of each collective kind, and per collective to a ``bench_layer.py`` JSON.

    Uses the rows measured with the ``naive`` backend (or strategies without one), where nothing overlaps,
    so ``time = flops/rate + sum_kind bytes_kind/bandwidth_kind + latency_units*latency`` holds term by
    term. Kinds get separate bandwidths because they can differ a lot (on CPU gloo a reduce-scatter moves
    a byte several times slower than an all-gather). Rows are weighed by 1/measured time (relative
    errors) and every coefficient is kept >= 0.
    """
    source = bench if isinstance(bench, str) else bench.get("source", "bench")
    data = json.load(open(bench)) if isinstance(bench, str) else bench
    rows = []
    for r in data["results"]:
        if r.get("status") != "ok" or r["backend"] not in ("naive", "n/a"):
            continue
        if Variant.parse(r["strategy"]).zero3:  # FSDP2 overlaps its collectives whatever the backend
            continue
        rows.append(
            {
                **r,
                "config": data["config"],
                "batch": data["batch"],
                "world": data["world"],
                "layers": data["layers"],
                "dtype_bytes": data["dtype_bytes"],
                "memory_bytes": data.get("memory_bytes_per_rank", 0),
            }
        )
    if len(rows) < 3:
        raise ValueError(f"{source}: {len(rows)} usable rows (status ok, naive backend); need at least 3 to fit")
    feats = torch.tensor([_features(r) for r in rows], dtype=torch.float64)
    meas = torch.tensor([r["median_s"] for r in rows], dtype=torch.float64)
    scale = feats.abs().amax(0).clamp_min(1e-30)
    x = _nonneg_lstsq(feats / scale / meas[:, None], torch.ones_like(meas)) / scale
    pred = feats @ x
    residual = float(((pred - meas) / meas).square().mean().sqrt())

    def rate(coef: torch.Tensor) -> float:
        # A coefficient fitted to 0 means its term never mattered in this run: the rate is then "infinite".
        return 1 / max(float(coef), 1 / _UNRESOLVED)

    bandwidths = {g: rate(x[1 + k]) for k, g in enumerate(_GROUPS)}
    cal = Calibration(rate(x[0]), bandwidths, float(x[-1]), source, residual)
    for r, p in zip(rows, pred.tolist()):
        cal.rows.append({**r, "predicted_s": p})
    return cal


def calibration_report(cal: Calibration) -> str:
    """The fitted values and a measured-against-predicted table of the fitted rows."""
    bw = ", ".join(
        f"{g} {b / 1e9:.3f} GB/s" if b < _UNRESOLVED else f"{g} not resolved" for g, b in cal.bytes_per_s.items()
    )
    lines = [
        f"calibrated from {cal.source}: {cal.flops_per_s / 1e9:.2f} GFLOP/s; {bw}; "
        f"{cal.latency_s * 1e6:.0f} us per collective; rms relative error {cal.residual:.0%}",
        "",
        "| strategy | backend | seq | measured ms | predicted ms |",
        "|---|---|---|---|---|",
    ]
    for r in cal.rows:
        lines.append(
            f"| {r['strategy']} | {r['backend']} | {r['seq']} "
            f"| {r['median_s'] * 1e3:.1f} | {r['predicted_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)
