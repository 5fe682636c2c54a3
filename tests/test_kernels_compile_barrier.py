"""The barrier kernel (odykernels/barrier.py) compiled for sm_80 and sm_90, no GPU needed.

What replaces torch's trapping barrier must, in the compiled code: wait with an acquire at system scope (peers
write the words over NVLink), signal with a release at system scope, bound its wait by the global timer, and
never trap. Compiled in a child process with ``TRITON_INTERPRET`` removed, like tests/test_kernels_compile.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from odykernels.barrier import _barrier_kernel
signature = {"pad_ptr": "*u32", "pad_offsets_ptr": "*i64", "status_ptr": "*i32", "USE_CLOCK": "constexpr"}
for arg in ("rank", "world", "base", "tag", "epoch", "budget"):
    signature[arg] = "i32"
out = {}
for cap in (80, 90):
    src = ASTSource(fn=_barrier_kernel, signature=signature, constexprs={"USE_CLOCK": True}, attrs={})
    ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 1}).asm["ptx"]
    out[cap] = {
        "memory": sorted(set(re.findall(r"\\b(?:atom|ld|st|red)\\.global[a-z0-9.]*", ptx))),
        "trap": bool(re.search(r"\\btrap\\b", ptx)),
        "globaltimer": "%globaltimer" in ptx,
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=ROOT, env=env, text=True, capture_output=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cap", ["80", "90"])
def test_barrier_compiled_code_acquires_releases_and_never_traps(compiled, cap):
    r = compiled[cap]
    memory = r["memory"]
    assert "ld.global.sys.acquire.b32" in memory, f"sm_{cap}: no system-scope acquire in the wait: {memory}"
    assert "atom.global.sys.release.exch.b32" in memory, f"sm_{cap}: no system-scope release signal: {memory}"
    # A 32-bit load without an ordering (a flag word read plainly) would see a signal without its data.
    assert not {"ld.global.b32", "ld.global.u32"} & set(memory), f"sm_{cap}: a plain load of a flag word: {memory}"
    assert r["globaltimer"], f"sm_{cap}: the wait is not bounded by the global timer"
    assert not r["trap"], f"sm_{cap}: the barrier traps"
