"""Ahead-of-time compile of every kernel for a GPU target, no GPU needed, and what the compiled code shows.

Used by tests/test_kernels_compile.py (the proof in CI) and docs/KERNELS.md. Kernels are compiled with the
specializations the JIT would apply to contiguous, 16-byte aligned inputs: unit inner strides become the
constant 1, pointers and the other strides are known multiples of 16. :func:`inspect` reads the PTX, the
TTGIR, the cubin's resource usage (``cuobjdump``, shipped with Triton) and ptxas's own ``-v`` report.
Must run in a process where ``TRITON_INTERPRET`` was not set when triton was imported (the kernels must be
real jit functions).
"""

from __future__ import annotations

import collections
import contextlib
import io
import re
import subprocess
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from odykernels._memory_order import memory_order, param_indices
from odykernels.ag_matmul import _ag_matmul_kernel, _ag_matmul_tma_kernel, lookahead
from odykernels.matmul import (
    SM80_CONFIGS,
    SM90_CONFIGS,
    SMEM_LIMIT,
    TileConfig,
    _matmul_kernel,
    _matmul_tma_kernel,
    prune_configs,
    select_config,
)
from odykernels.matmul_rs import (
    ALIGN_BYTES,
    REDUCE_BLOCK,
    REDUCE_NUM_WARPS,
    _matmul_rs_kernel,
    _matmul_rs_tma_kernel,
    _reduce_slots_kernel,
)

KERNELS = {
    ("matmul", "pointer"): _matmul_kernel,
    ("matmul", "tma"): _matmul_tma_kernel,
    ("ag_matmul", "pointer"): _ag_matmul_kernel,
    ("ag_matmul", "tma"): _ag_matmul_tma_kernel,
    ("matmul_rs", "pointer"): _matmul_rs_kernel,
    ("matmul_rs", "tma"): _matmul_rs_tma_kernel,
    ("reduce_slots", "pointer"): _reduce_slots_kernel,
}
# The kernels whose inner loop is a tl.dot (tensor cores: wgmma on sm_90, mma.sync on sm_80).
DOT_KERNELS = ("matmul", "ag_matmul", "matmul_rs")
CAPABILITIES = (80, 90)
DTYPES = ("bf16", "fp16")
# SM counts of the A100 and H100 SXM, for the config choice at each capability.
NUM_SMS = {80: 108, 90: 132}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Tensor-parallel GEMM shapes at world 8 for 8192 tokens: (label, M, K, N), four per model (d = model width,
# q and kv = query and key/value heads of 128 dims, ffn = MLP width): QKV: K = d, N = (q + 2 kv) x 128 / 8;
# o_proj: K = d / 8, N = d; gate/up fused: K = d, N = 2 x ffn / 8; down: K = ffn / 8, N = d. Plus a skinny
# N = d / 8 = 512 (one rank's slice of a square d x d projection).
TOKENS = 8192
TP_WORLD = 8
HEAD_DIM = 128
# model: (d, q heads, kv heads, ffn)
TP_MODELS = {"llama2-7b": (4096, 32, 32, 11008), "llama3-8b": (4096, 32, 8, 14336), "llama2-70b": (8192, 64, 8, 28672)}
TP_SHAPES: list[tuple[str, int, int, int]] = [
    shape
    for model, (d, q, kv, ffn) in TP_MODELS.items()
    for shape in (
        (f"{model} qkv", TOKENS, d, (q + 2 * kv) * HEAD_DIM // TP_WORLD),
        (f"{model} o_proj", TOKENS, d // TP_WORLD, d),
        (f"{model} gate/up", TOKENS, d, 2 * ffn // TP_WORLD),
        (f"{model} down", TOKENS, ffn // TP_WORLD, d),
    )
] + [("skinny N=d/8", TOKENS, 4096, 4096 // TP_WORLD)]

# Pointer arguments other than the data tensors (which take the dtype being compiled).
_INDEX_POINTERS = {
    "flags_ptr": "*u32",
    "status_ptr": "*i32",
    "mtiles_ptr": "*i32",
    "counters_ptr": "*i32",
    "recv_offsets_ptr": "*i64",
    "flag_offsets_ptr": "*i64",
}
_OUT_POINTERS = ("c_ptr", "recv_ptr", "out_ptr")
# Inner strides of contiguous tensors; the JIT turns an integer argument equal to 1 into a constant.
_UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_cn", "stride_rn", "stride_on")
# Integer arguments the kernels exclude from specialization (they change per call or per rank).
_UNSPECIALIZED = ("rank", "expected", "epoch", "budget", "world", "num_mtiles", "rows")


def default_path(name: str, capability: int) -> str:
    """The path the launchers take on this capability with aligned operands."""
    return "tma" if capability >= 90 and name in DOT_KERNELS else "pointer"


def table(capability: int, path: str) -> dict[str, list[TileConfig]]:
    return SM90_CONFIGS if path == "tma" and capability >= 90 else SM80_CONFIGS


def table_configs(capability: int, path: str) -> list[TileConfig]:
    """Every config of the table a path uses on ``capability`` (what the autotuner may pick), in order."""
    return list(dict.fromkeys(c for configs in table(capability, path).values() for c in configs))


def selectable(capability: int, path: str, dtype: str, out_dtype: str) -> list[TileConfig]:
    """Table configs that fit ``sm_<capability>`` for these element sizes (what a launcher can run there)."""
    cap = divmod(capability, 10)
    return [
        c
        for c in table_configs(capability, path)
        if prune_configs([c], 1 << 20, 1 << 20, 1 << 20, _BYTES[dtype], cap, _BYTES[out_dtype], path)
    ]


def selected(capability: int, path: str, dtype: str, out_dtype: str | None = None) -> list[TileConfig]:
    """The deterministic picks for :data:`TP_SHAPES` (no autotuning), without repeats."""
    cap = divmod(capability, 10)
    out = _BYTES[out_dtype or dtype]
    picks = (select_config(M, N, K, _BYTES[dtype], cap, NUM_SMS[capability], out, path) for _, M, K, N in TP_SHAPES)
    return list(dict.fromkeys(picks))


def _constexprs(name: str, path: str, cfg: TileConfig | None, dtype: str, out_dtype: str, b_k_contiguous: bool):
    if name == "reduce_slots":
        block_m, block_n = REDUCE_BLOCK
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_CLOCK": True}, {"num_warps": REDUCE_NUM_WARPS}
    values = {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "EVEN_K": True,
        "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "OUT_VEC": ALIGN_BYTES // _BYTES[out_dtype],
        "RECV_VEC": ALIGN_BYTES // _BYTES[out_dtype],
        "A_COL_MAJOR": False,
        "B_K_CONTIGUOUS": b_k_contiguous,
        "LOOKAHEAD": lookahead(cfg),  # what prepare_ag_matmul launches with
        "PREFETCH": 0,  # interpreter only: compiled, the software pipeline loads ahead
        "USE_CLOCK": True,  # compiled kernels bound their waits by the GPU's global timer
        "USE_ASM": True,
    }
    arg_names = KERNELS[(name, path)].arg_names
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return {k: v for k, v in values.items() if k in arg_names}, options


def compile_kernel(
    name: str,
    capability: int,
    dtype: str,
    path: str | None = None,
    config: TileConfig | None = None,
    out_dtype: str | None = None,
    b_k_contiguous: bool = True,
):
    """Compile kernel ``name`` on ``path`` for ``sm_<capability>`` with ``dtype`` ("bf16", "fp16", "fp32") inputs.

    ``config`` defaults to the launcher's pick for an 8192 x 4096 x 4096 problem; ``out_dtype`` (the output's
    or receive buffer's dtype) to ``dtype``; ``b_k_contiguous``: B is ``weight.t()`` of an ``nn.Linear`` (the
    layout odysseus passes), else row-major. Returns triton's compiled kernel (``.asm``, ``.metadata``).
    """
    path = path or default_path(name, capability)
    kernel = KERNELS[(name, path)]
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("odykernels was imported with TRITON_INTERPRET=1; compile in a clean process")
    out_dtype = out_dtype or dtype
    if config is None and name != "reduce_slots":
        config = select_config(8192, 4096, 4096, _BYTES[dtype], divmod(capability, 10), NUM_SMS[capability],
                               _BYTES[out_dtype], path)  # fmt: skip
    constexprs, options = _constexprs(name, path, config, dtype, out_dtype, b_k_contiguous)
    unit_strides = _UNIT_STRIDES if b_k_contiguous else (*_UNIT_STRIDES[:1], "stride_bn", *_UNIT_STRIDES[2:])
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in unit_strides:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg == "a_desc":
            signature[arg] = f"tensordesc<{dtype}[{config.block_m}, {config.block_k}]>"
        elif arg == "b_desc":
            block = [config.block_n, config.block_k] if b_k_contiguous else [config.block_k, config.block_n]
            signature[arg] = f"tensordesc<{dtype}[{block[0]}, {block[1]}]>"
        elif arg.endswith("_ptr"):
            signature[arg] = _INDEX_POINTERS.get(arg, f"*{out_dtype}" if arg in _OUT_POINTERS else f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg not in _UNSPECIALIZED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(signature)
    if missing:
        raise KeyError(f"{name}: constexprs {sorted(missing)} are not arguments of the kernel")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # triton runs `ptxas -v` anyway; this prints its report, caught here
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    _PTXAS_LOGS[id(compiled)] = log.getvalue()
    _ARGS[id(compiled)] = [
        (a, signature[a].startswith("tensordesc")) for a in kernel.arg_names if signature[a] != "constexpr"
    ]
    return compiled


# `ptxas -v` reports of the kernels compiled by this process (empty for a kernel Triton took from its cache).
_PTXAS_LOGS: dict[int, str] = {}
# The non-constexpr arguments of each compiled kernel (name, is a tensor descriptor): its PTX parameters.
_ARGS: dict[int, list[tuple[str, bool]]] = {}


def ptxas_report(compiled) -> dict[str, int | None]:
    """Spill bytes and registers from the ``ptxas -v`` report of ``compiled`` (None if it came from the cache)."""
    log = _PTXAS_LOGS.get(id(compiled), "")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {
        "ptxas_spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
        "ptxas_regs": int(regs.group(1)) if regs else None,
    }


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes per thread of the cubin's kernel, from ``cuobjdump --dump-resource-usage``.

    A stack frame in these kernels (no local arrays, no recursion) is where ptxas spills registers, so
    ``stack == 0`` means no spills.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return {"regs": int(match.group(1)), "stack": int(match.group(2))}


def inspect(compiled, capability: int) -> dict:
    """What the compiled code shows: instruction counts, store widths, shared memory, registers, spills.

    ``st_global`` counts each ``st.global`` variant by its suffix (e.g. ``.v4.b32``: 128-bit);
    ``memory_order`` is :func:`odykernels._memory_order.memory_order` (flag accesses and their semantics);
    ``tma_prologue`` is how many K steps of TMA loads the software pipeline issues before its loop
    (-1 if the kernel has no TMA loads, 0 if the loop is not pipelined).
    """
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    order = memory_order(ptx, param_indices(ptx, _ARGS[id(compiled)]))
    stores = collections.Counter(m.group(1) for m in re.finditer(r"\bst\.global((?:\.[a-z0-9]+)*)", ptx))
    tma_copies = len(re.findall(r"ttng\.async_tma_copy_global_to_local", ttgir))
    # Two descriptor loads (A and B) per K step: the loop body holds one step, the prologue the rest.
    tma_prologue = tma_copies // 2 - 1 if tma_copies else -1
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "wgmma_shapes": sorted(set(re.findall(r"\bwgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "tma_loads": len(re.findall(r"\bcp\.async\.bulk\.tensor\.\w+\.shared::\w+\.global", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
        "fence_proxy_async_global": "fence.proxy.async.global" in ptx,
        "st_global": dict(stores),
        "tma_prologue": tma_prologue,
        "memory_order": order,
        "shared": compiled.metadata.shared,
        "smem_limit": SMEM_LIMIT[divmod(capability, 10)],
        **resource_usage(compiled.asm["cubin"]),
        **ptxas_report(compiled),
    }


def report(capabilities=CAPABILITIES, dtype: str = "bf16") -> str:
    """A markdown table of :func:`inspect` for every kernel and table config (docs/KERNELS.md's proof table)."""
    lines = [
        "| sm | kernel | path | config | regs | spill (stack B) | shared B | st.global | TMA loads | MMA | prologue |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cap in capabilities:
        for name in (*DOT_KERNELS, "reduce_slots"):
            path = default_path(name, cap)
            configs = table_configs(cap, path) if name in DOT_KERNELS else [None]
            for cfg in configs:
                r = inspect(compile_kernel(name, cap, dtype, path, cfg), cap)
                stores = ", ".join(f"{k[1:]} x{v}" for k, v in sorted(r["st_global"].items()))
                mma = f"wgmma {'/'.join(r['wgmma_shapes'])}" if r["wgmma"] else (
                    f"mma.sync x{r['mma_sync']}" if r["mma_sync"] else "-")  # fmt: skip
                lines.append(
                    f"| {cap} | {name} | {path} | {cfg or '64x128 w4'} | {r['regs']} | {r['stack']} | {r['shared']} "
                    f"| {stores} | {r['tma_loads']} | {mma} | {max(r['tma_prologue'], 0)} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"triton {triton.__version__}, bf16 inputs and outputs, B = weight.t()")
    print(report())
