"""Every kernel compiles for sm_80 and sm_90 in bf16 and fp16, without a GPU; the GEMMs use tensor cores.

The compiles run in child processes (one per capability, concurrently) with ``TRITON_INTERPRET`` removed
and a fresh Triton cache, so they really compile and are immune to what this process imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from odykernels._compile import CAPABILITIES, DOT_KERNELS, DTYPES, KERNELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, sys
from odykernels._compile import KERNELS, compile_kernel
cap = int(sys.argv[1])
results = {}
for name in KERNELS:
    for dtype in sys.argv[2:]:
        try:
            c = compile_kernel(name, cap, dtype)
            ptx = c.asm["ptx"]
            results[f"{name}/{dtype}"] = {
                "error": None, "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
                "cubin_bytes": len(c.asm["cubin"]), "shared": c.metadata.shared,
            }
        except Exception as e:  # report every kernel, not just the first failure
            results[f"{name}/{dtype}"] = {"error": f"{type(e).__name__}: {e}"[-4000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, int, str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    procs = {
        cap: subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(cap), *DTYPES],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for cap in CAPABILITIES
    }
    results = {}
    for cap, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"compile child for sm_{cap} failed:\n{err[-4000:]}"
        for key, value in json.loads(out.strip().splitlines()[-1]).items():
            name, dtype = key.split("/")
            results[(name, cap, dtype)] = value
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles(compiled, name, capability, dtype):
    result = compiled[(name, capability, dtype)]
    assert result["error"] is None, result["error"]
    assert result["cubin_bytes"] > 0
    if name in DOT_KERNELS:
        # Tensor cores: warpgroup MMA on Hopper, mma.sync on Ampere.
        if capability == 90:
            assert result["wgmma"], f"{name} {dtype} sm_90: no wgmma in the PTX"
        else:
            assert result["mma_sync"], f"{name} {dtype} sm_80: no mma.sync in the PTX"
