"""The proof in CI, from compiled code (no GPU needed): every kernel, every config it can run with.

For sm_90 and sm_80, in bf16 (every config of the tables, which is what the autotuner may pick), fp16 (the
deterministic picks at the Llama tensor-parallel shapes) and with an fp32 receive buffer for matmul_rs:

* the GEMMs use tensor cores: ``wgmma`` on sm_90, ``mma.sync`` on sm_80;
* on sm_90 their loads are TMA (``cp.async.bulk.tensor``, no ``cp.async``), in a software-pipelined loop
  (the pipeline prologue issues 1 .. num_stages-1 K steps), and ag_matmul's flag lookahead (num_stages
  iterations) is deeper than that prologue and its waits end in ``fence.proxy.async.global``;
* every ``st.global`` is 128-bit (``.v4``): the outputs and matmul_rs's peer stores, never 16-bit scalars;
* memory order (odykernels/_memory_order.py, instructions tied to flag words by data flow from
  ``flags_ptr``): every flag read is an acquire at system scope and every loop that reads a flag holds one,
  no plain ``ld.global`` of a flag word, every flag write (matmul_rs's notify) a release at system scope,
  and the tile counter's increment ``atom.acq_rel.sys``;
* no spills (ptxas's ``-v`` report: 0 bytes of spill stores and loads; and no stack frame in the cubin),
  at most 255 registers, shared memory within the card's limit (and, on the TMA path, within the estimate
  the config pruning uses).

The compiles run in child processes (one per capability, concurrently) with ``TRITON_INTERPRET`` removed
and a fresh Triton cache, so they really compile and are immune to what this process imported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from odykernels._compile import (
    CAPABILITIES,
    DOT_KERNELS,
    DTYPES,
    default_path,
    selectable,
    selected,
)
from odykernels.ag_matmul import lookahead
from odykernels.matmul import TileConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    capability: int
    dtype: str
    path: str
    config: TileConfig | None = None
    out_dtype: str | None = None
    b_k_contiguous: bool = True

    @property
    def id(self) -> str:
        out = f"->{self.out_dtype}" if self.out_dtype else ""
        layout = "" if self.b_k_contiguous else "-b_row_major"
        cfg = f"-{self.config}".replace(" ", "_") if self.config else ""
        return f"sm{self.capability}-{self.name}-{self.path}-{self.dtype}{out}{cfg}{layout}"


def _jobs() -> list[Job]:
    jobs = []
    for cap in CAPABILITIES:
        for name in DOT_KERNELS:
            path = default_path(name, cap)
            jobs += [Job(name, cap, "bf16", path, c) for c in selectable(cap, path, "bf16", "bf16")]
            jobs += [Job(name, cap, "fp16", path, c) for c in selected(cap, path, "fp16")]
            if name == "matmul_rs":
                jobs += [Job(name, cap, "bf16", path, c, "fp32") for c in selectable(cap, path, "bf16", "fp32")]
            if path == "tma":  # the fallback for operands TMA cannot load still compiles with tensor cores
                jobs.append(Job(name, cap, "bf16", "pointer", selected(cap, "pointer", "bf16")[0]))
        path = default_path("matmul", cap)
        jobs.append(Job("matmul", cap, "bf16", path, selected(cap, path, "bf16")[0], b_k_contiguous=False))
        jobs += [Job("reduce_slots", cap, dtype, "pointer") for dtype in DTYPES]
    return jobs


JOBS = _jobs()

_CHILD = """
import json, sys
from odykernels._compile import compile_kernel, inspect
from odykernels.ag_matmul import lookahead
from odykernels.matmul import TileConfig
results = {}
for job in json.loads(sys.stdin.read()):
    cfg = TileConfig(**job["config"]) if job["config"] else None
    try:
        c = compile_kernel(job["name"], job["capability"], job["dtype"], job["path"], cfg, job["out_dtype"],
                           job["b_k_contiguous"])
        results[job["id"]] = {"error": None, **inspect(c, job["capability"])}
    except Exception as e:  # report every kernel, not just the first failure
        results[job["id"]] = {"error": f"{type(e).__name__}: {e}"[-4000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> dict[str, dict]:
    # Only the jobs of the tests this session runs (``-k`` selects a few for a quick check or a mutant).
    params = (getattr(item, "callspec", None) for item in request.session.items)
    wanted = {p.params["job"] for p in params if p is not None and "job" in p.params}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    procs = {}
    for cap in CAPABILITIES:
        payload = [
            {**dataclasses.asdict(j), "config": dataclasses.asdict(j.config) if j.config else None, "id": j.id}
            for j in JOBS
            if j.capability == cap and j in wanted
        ]
        if not payload:
            continue
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        proc.stdin.write(json.dumps(payload))
        proc.stdin.close()
        procs[cap] = proc
    results = {}
    for cap, proc in procs.items():
        out = proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(timeout=600) == 0, f"compile child for sm_{cap} failed:\n{err[-4000:]}"
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.id)
def test_compiled_code(compiled, job):
    r = compiled[job.id]
    assert r["error"] is None, r["error"]
    what = job.id
    if job.name in DOT_KERNELS:
        if job.capability >= 90:
            assert r["wgmma"] > 0, f"{what}: no wgmma in the PTX"
        else:
            assert r["mma_sync"] > 0 and r["wgmma"] == 0, f"{what}: expected mma.sync, got {r}"
        if job.path == "tma":
            assert r["tma_loads"] > 0 and r["cp_async"] == 0, f"{what}: GEMM loads are not all TMA: {r}"
            stages = job.config.num_stages
            # Pipelined (some K steps issued ahead), and never as far ahead as ag_matmul's lookahead (the value
            # prepare_ag_matmul launches with).
            assert 1 <= r["tma_prologue"] <= stages - 1, f"{what}: TMA prologue depth {r['tma_prologue']}"
            assert r["tma_prologue"] < lookahead(job.config), f"{what}: prologue {r['tma_prologue']} >= LOOKAHEAD"
            out_size = _BYTES[job.out_dtype or job.dtype]
            estimate = job.config.smem_bytes(_BYTES[job.dtype], out_size, "tma")
            assert r["shared"] <= estimate, f"{what}: {r['shared']} B of shared memory > the estimate {estimate}"
        else:
            assert r["tma_loads"] == 0 and r["cp_async"] > 0, f"{what}: expected cp.async loads: {r}"
        if job.name == "ag_matmul" and job.path == "tma":
            assert r["fence_proxy_async_global"], f"{what}: no fence.proxy.async.global after the flag waits"
    _check_memory_order(job, r["memory_order"])
    stores = r["st_global"]
    assert stores, f"{what}: no global stores at all"
    assert all(kind.startswith(".v4.") for kind in stores), f"{what}: not only 128-bit stores: {stores}"
    assert r["stack"] == 0, f"{what}: a {r['stack']}-byte stack frame: registers spill"
    # ptxas's own report (the child compiles with an empty cache, so ptxas always runs).
    assert r["ptxas_spill_bytes"] == 0, f"{what}: ptxas reports {r['ptxas_spill_bytes']} bytes of spill traffic"
    assert r["ptxas_regs"] == r["regs"], f"{what}: ptxas used {r['ptxas_regs']} registers, the cubin says {r['regs']}"
    assert r["regs"] <= 255, f"{what}: {r['regs']} registers"
    assert r["shared"] <= r["smem_limit"], f"{what}: {r['shared']} B of shared memory > {r['smem_limit']}"


def _check_memory_order(job: Job, order: dict) -> None:
    """The flag protocol's memory order in the PTX (rules, and why system scope: odykernels/_memory_order.py)."""
    what = job.id
    assert not order["violations"], f"{what}: " + "; ".join(order["violations"])
    waits = job.name in ("ag_matmul", "reduce_slots")
    # Not vacuous: kernels that wait read flags (with acquire) in loops; matmul_rs notifies and counts.
    assert (order["flag_reads"] > 0 and order["wait_loops"] > 0) == waits, f"{what}: flag reads {order}"
    produces = job.name == "matmul_rs"
    assert (order["notifies"] > 0 and order["counter_acq_rel"] > 0) == produces, f"{what}: notifies {order}"


def test_every_kernel_and_capability_is_compiled():
    covered = {(j.name, j.capability, j.path) for j in JOBS}
    for cap in CAPABILITIES:
        for name in (*DOT_KERNELS, "reduce_slots"):
            assert (name, cap, default_path(name, cap)) in covered
