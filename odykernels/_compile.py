"""Ahead-of-time compile of every kernel for a GPU target, no GPU needed (used by tests/test_compile.py).

Each kernel is compiled with the config its launcher would pick for a representative large problem on that
card, and with the specializations the JIT would apply to contiguous inputs: unit inner strides become
the constant 1, pointers and the other strides are known multiples of 16. Must run in a process where
``TRITON_INTERPRET`` was not set when triton was imported (the kernels must be real jit functions).
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from odykernels.ag_matmul import _ag_matmul_kernel
from odykernels.matmul import _matmul_kernel, select_config
from odykernels.matmul_rs import REDUCE_BLOCK, REDUCE_NUM_WARPS, _matmul_rs_kernel, _reduce_slots_kernel

KERNELS = {
    "matmul": _matmul_kernel,
    "ag_matmul": _ag_matmul_kernel,
    "matmul_rs": _matmul_rs_kernel,
    "reduce_slots": _reduce_slots_kernel,
}
# The kernels whose inner loop is a tl.dot (tensor cores: wgmma on sm_90).
DOT_KERNELS = ("matmul", "ag_matmul", "matmul_rs")
CAPABILITIES = (80, 90)
DTYPES = ("bf16", "fp16")
# SM counts of the A100 and H100 SXM, for the config choice at each capability.
NUM_SMS = {80: 108, 90: 132}
# Representative problem for the config choice: an 8k-token sequence through a 4096-wide projection.
SHAPE = {"M": 8192, "N": 4096, "K": 4096}

# Pointer arguments other than the data tensors (which take the dtype being compiled).
_INDEX_POINTERS = {
    "flags_ptr": "*u32",
    "status_ptr": "*i32",
    "mtiles_ptr": "*i32",
    "counters_ptr": "*i32",
    "recv_offsets_ptr": "*i64",
    "flag_offsets_ptr": "*i64",
}
# Inner strides of contiguous tensors; the JIT turns an integer argument equal to 1 into a constant.
_UNIT_STRIDES = ("stride_ak", "stride_bn", "stride_cn", "stride_rn", "stride_on")
# Integer arguments the kernels exclude from specialization (they change per call or per rank).
_UNSPECIALIZED = ("rank", "expected", "epoch", "budget", "world", "num_mtiles", "rows")


def _constexprs(name: str, capability: int, dtype: str) -> tuple[dict, dict]:
    """(constexpr values, launch options) the launcher would use for SHAPE on this capability."""
    if name == "reduce_slots":
        block_m, block_n = REDUCE_BLOCK
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_CLOCK": True}, {"num_warps": REDUCE_NUM_WARPS}
    elem_size = 2 if dtype in ("bf16", "fp16") else 4
    cfg = select_config(SHAPE["M"], SHAPE["N"], SHAPE["K"], elem_size, divmod(capability, 10), NUM_SMS[capability])
    constexprs = {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "EVEN_K": SHAPE["K"] % cfg.block_k == 0,
        "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
    }
    if "USE_CLOCK" in KERNELS[name].arg_names:
        constexprs["USE_CLOCK"] = True  # compiled kernels bound their waits by the GPU's global timer
    return constexprs, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def compile_kernel(name: str, capability: int, dtype: str):
    """Compile kernel ``name`` for ``sm_<capability>`` with ``dtype`` ("bf16", "fp16", "fp32") data.

    Returns triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).
    """
    kernel = KERNELS[name]
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("odykernels was imported with TRITON_INTERPRET=1; compile in a clean process")
    constexprs, options = _constexprs(name, capability, dtype)
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in _UNIT_STRIDES:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            signature[arg] = _INDEX_POINTERS.get(arg, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg not in _UNSPECIALIZED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(signature)
    if missing:
        raise KeyError(f"{name}: constexprs {sorted(missing)} are not arguments of the kernel")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
