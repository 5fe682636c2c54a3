"""Persistent tiled GEMM ``C = A @ B``, and what the three GEMM launchers share: configs, checks, path
choice, :func:`plan_gemm` (their kernels share the tile helpers of :mod:`odykernels._tiles`).

Two code paths, chosen on the host per call (:func:`choose_path`), each compiled for its target:

* ``"tma"`` (sm_90 and newer, operands 16-byte aligned): A and B tiles arrive through tensor descriptors
  (TMA, ``cp.async.bulk.tensor``). Each program runs ONE flattened loop over (its tiles) x (K steps), so
  the software pipeline keeps loading the next tile's first K blocks while the current tile's epilogue
  stores, instead of draining and refilling per tile.
* ``"pointer"`` (sm_80, unaligned or K == 0 operands, and the default under the interpreter): pointer
  loads the compiler turns into ``cp.async``, one K loop per tile (``_tiles.tile_dot``).

Programs walk output tiles ``pid, pid + P, pid + 2P, ...`` in grouped order (``GROUP_M`` M-tiles side
by side sweep N together, so their A rows and B columns stay in L2).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from odykernels._runtime import (
    Launch,
    check_supported_device,
    device_info,
    is_interpreted,
    normalize_device,
    num_programs,
)
from odykernels._tiles import (
    flat_loop_bounds,
    grouped_tile,
    store_tile,
    tile_dot,
    tile_offsets,
    tma_dot_step,
    wrapped_cols,
)

PATHS = ("tma", "pointer")

# ----------------------------------------------------------------------------------------- metadata


def _nbytes(arg) -> tuple[tuple[int, ...], int]:
    """(shape, element size) of a kernel argument that is a tensor or a tensor descriptor."""
    if isinstance(arg, TensorDescriptor):
        return tuple(arg.base.shape), arg.base.element_size()
    return tuple(arg.shape), arg.element_size()


def gemm_launch_metadata(op: str, path: str):
    """A ``launch_metadata`` hook: ``name``, ``flops`` (and ``flops<bits>``, proton's key) and ``bytes``.

    Triton calls it only when a launch hook is installed (the proton profiler, ``knobs.runtime``), so it
    costs nothing otherwise. ``bytes`` counts A, B and C once each (the compulsory traffic).
    """

    def metadata(grid, kernel, args) -> dict:
        (M, K), a_size = _nbytes(args["a_desc"] if "a_desc" in args else args["a_ptr"])
        (_, N), b_size = _nbytes(args["b_desc"] if "b_desc" in args else args["b_ptr"])
        c_size = args["recv_ptr" if "recv_ptr" in args else "c_ptr"].element_size()
        flops = 2.0 * M * N * K
        return {
            "name": f"odykernels.{op}[{path}] M={M} N={N} K={K}",
            "flops": flops,
            f"flops{8 * a_size}": flops,
            "bytes": a_size * M * K + b_size * K * N + c_size * M * N,
        }

    return metadata


# ----------------------------------------------------------------------------------------- kernels


@triton.jit(launch_metadata=gemm_launch_metadata("matmul", "pointer"))
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, OUT_VEC: tl.constexpr,
):  # fmt: skip
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        rows, cols = tile_offsets(pid_m * BLOCK_M, pid_n, BLOCK_M, BLOCK_N)
        acc = tile_dot(
            a_ptr, b_ptr, rows % M, wrapped_cols(pid_n, N, BLOCK_N), K, stride_am, stride_ak, stride_bk, stride_bn,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION,
        )  # fmt: skip
        store_tile(c_ptr, acc, rows, cols, M, N, stride_cm, stride_cn, OUT_VEC)


@triton.jit(launch_metadata=gemm_launch_metadata("matmul", "tma"))
def _matmul_tma_kernel(
    a_desc, b_desc, c_ptr,
    M, N, K,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_COL_MAJOR: tl.constexpr, B_K_CONTIGUOUS: tl.constexpr, INPUT_PRECISION: tl.constexpr, OUT_VEC: tl.constexpr,
):  # fmt: skip
    # One loop over this program's (tile, K step) pairs. The tile advance sits in its own `if` at the top
    # and the epilogue in another at the bottom: Triton's pipeliner puts the first (with the loads that
    # depend on it) in its first stage and the second (with the dot) in its last. Both in one `if` at the
    # bottom leaves the loop unpipelined (triton 3.7.1, sm_90: 48 KiB of shared memory, one stage).
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n, k_tiles, my_tiles = flat_loop_bounds(pid, progs, num_pid_m, N, K, BLOCK_N, BLOCK_K)
    tile, ki, pid_m, pid_n = pid - progs, -1, 0, 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, my_tiles * k_tiles):
        ki = tl.where(ki == k_tiles - 1, 0, ki + 1)
        if ki == 0:
            tile += progs
            pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tma_dot_step(
            acc, a_desc, b_desc, pid_m * BLOCK_M, ki, pid_n, BLOCK_N, BLOCK_K, A_COL_MAJOR, B_K_CONTIGUOUS,
            INPUT_PRECISION,
        )  # fmt: skip
        if ki == k_tiles - 1:
            rows, cols = tile_offsets(pid_m * BLOCK_M, pid_n, BLOCK_M, BLOCK_N)
            store_tile(c_ptr, acc, rows, cols, M, N, stride_cm, stride_cn, OUT_VEC)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


# ----------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of the GEMM kernels (matmul, ag_matmul, matmul_rs)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def smem_bytes(self, elem_size: int, out_elem_size: int | None = None, path: str = "pointer") -> int:
        """Shared memory the kernel is expected to need, bytes.

        The pipelined A and B tiles; on the TMA path also the epilogue's layout-conversion scratch, live at
        the same time because the next tile's loads are in flight during the epilogue. The scratch term is
        measured, not derived (compiled for sm_90, triton 3.6.0 and 3.7.1): 16-bit outputs use at most
        32 KiB (half of a 128x256 tile), fp32 outputs the whole tile (128 KiB for 128x256, which no longer
        fits beside three stages); ``tests/test_kernels_compile.py`` checks that the estimate bounds the real figure
        for every table config. The pointer path's epilogue reuses the pipeline buffers (its K loop ended).
        """
        stages = self.num_stages * (self.block_m * self.block_k + self.block_k * self.block_n) * elem_size
        if path != "tma":
            return stages
        out = elem_size if out_elem_size is None else out_elem_size
        tile = self.block_m * self.block_n * out
        scratch = tile if out >= 4 else min(tile, 32768)
        return stages + scratch + 1024  # + the mbarriers and alignment

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> TileConfig:
    return TileConfig(bm, bn, bk, group_m=group_m, num_warps=warps, num_stages=stages)


# Config tables, per architecture and regime, most preferred first (the first is the deterministic pick
# when it makes at least one tile per SM, see select_config; on a GPU the autotuner times all of them).
# None of them has been timed by this project yet (no GPU so far); they come from the Triton
# persistent-matmul tutorial's H100 autotune space (BLOCK_M 128, BLOCK_N 128/256, BLOCK_K 64, 3-4 stages,
# 8 warps), and each is compiled for sm_90 in CI: 0 spills, <= 255 registers, shared memory under the
# H100's 227 KiB (tests/test_kernels_compile.py).
#
# Regimes (see regime()): "small_m" M <= 1024 (short sequences: 64-row tiles give the SMs work);
# "narrow_n" N <= 1024 (QKV at world 8 of a GQA model, N = d/8): fewer 128x256 tiles than SMs, so
# 128x128 first; "short_k" K <= 1024 (o_proj at world 8: K = d/8 = 512): 8 K steps per tile, so the
# epilogue is a large share of a tile and a fourth stage keeps more of the next tile's loads in flight;
# "large" otherwise.
SM90_CONFIGS: dict[str, list[TileConfig]] = {
    "large": [_cfg(128, 256, 64, 8, 3), _cfg(128, 256, 64, 8, 4), _cfg(128, 128, 64, 8, 4)],
    "short_k": [_cfg(128, 256, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4)],
    "narrow_n": [_cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)],
    "small_m": [_cfg(64, 128, 64, 4, 4), _cfg(128, 128, 64, 8, 4), _cfg(64, 64, 64, 4, 4)],
}
# sm_80 (pointer path, cp.async + mma.sync): the configs this project used before the sm_90 path, for
# every regime, less 128x256 tiles. Without wgmma, 8 warps hold the 128x256 fp32 accumulator in 128 of
# a thread's 255 registers, and what the loop needs beside it no longer fits on triton 3.9 (compiled for
# sm_80, bf16): 128x256x64/8/3 spills ag_matmul to an 8-byte stack, and so do 128x256x32/8/3 and /8/4
# (matmul with B row-major) and 128x256x64/8/4 (ag_matmul). On triton 3.6 and 3.7.1 they compiled at 233-255.
SM80_CONFIGS: dict[str, list[TileConfig]] = {
    regime: [_cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4)]
    for regime in ("large", "short_k", "narrow_n", "small_m")
}
# Considered and left out, each with its reason (compiled for sm_90 bf16 with triton 3.7.1; not timed).
DISABLED_CONFIGS: list[tuple[TileConfig, str]] = [
    (_cfg(128, 256, 128, 8, 3), "A/B stages alone need 3 x 96 KiB = 288 KiB, over the H100's 227 KiB"),
    (_cfg(128, 256, 64, 4, 3), "4 warps hold the 128x256 fp32 accumulator in 256 registers per thread: spills"),
    (_cfg(128, 256, 64, 8, 5), "5 x 48 KiB stages + 32 KiB epilogue scratch = 272 KiB, over 227 KiB"),
    (_cfg(256, 128, 64, 8, 3), "same accumulator and shared memory as 128x256 but B tiles half as wide: "
     "the tutorial's H100 autotune space never picks it; kept out to keep the tuning short"),
]  # fmt: skip

# Interpreter only: every tl.dot costs about 7 ms on the CPU whatever its size, and tests run tiny shapes,
# so the smallest legal dot (16x16x16) keeps them fast while a 2-wide group still exercises the ordering.
# num_stages sets ag_matmul's flag lookahead there and the depth of its emulated TMA prefetch (num_stages - 1
# steps, see ag_matmul.prefetch_step): 3 makes the lookahead span several tiles when K is one block.
INTERPRETER_CONFIG = TileConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=3)

# Largest dynamic shared memory per block, bytes, by compute capability (CUDA programming guide).
SMEM_LIMIT = {
    (8, 0): 166912,
    (8, 6): 101376,
    (8, 7): 166912,
    (8, 9): 101376,
    (9, 0): 232448,
    (10, 0): 232448,
    (12, 0): 101376,
}
SMEM_LIMIT_DEFAULT = 101376

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def regime(M: int, N: int, K: int) -> str:
    """The config table row a problem uses: "small_m", "narrow_n", "short_k" or "large" (first that applies)."""
    if M <= 1024:
        return "small_m"
    if N <= 1024:
        return "narrow_n"
    if K <= 1024:
        return "short_k"
    return "large"


def config_table(capability: tuple[int, int], path: str) -> dict[str, list[TileConfig]]:
    """The regime -> configs table for a card and code path."""
    return SM90_CONFIGS if path == "tma" and tuple(capability) >= (9, 0) else SM80_CONFIGS


def prune_configs(
    configs: list[TileConfig],
    M: int,
    N: int,
    K: int,
    elem_size: int,
    capability: tuple[int, int],
    out_elem_size: int | None = None,
    path: str = "pointer",
) -> list[TileConfig]:
    """Configs that fit the card's shared memory and are not taller than the problem needs.

    A config whose ``block_m`` exceeds M rounded up to a power of two only computes padding rows; it is
    kept when nothing smaller is left, so the result is never empty while one config fits.
    """
    limit = SMEM_LIMIT.get(tuple(capability), SMEM_LIMIT_DEFAULT)
    fits = [c for c in configs if c.smem_bytes(elem_size, out_elem_size, path) <= limit]
    tall_enough = [c for c in fits if c.block_m <= max(16, triton.next_power_of_2(M))]
    return tall_enough or fits[-1:]


def candidate_configs(
    M: int,
    N: int,
    K: int,
    elem_size: int,
    capability: tuple[int, int],
    num_sms: int,
    out_elem_size: int | None = None,
    path: str = "pointer",
) -> list[TileConfig]:
    """The regime's configs that fit, the deterministic pick first (the autotuner's candidates)."""
    table = config_table(capability, path)
    configs = prune_configs(table[regime(M, N, K)], M, N, K, elem_size, capability, out_elem_size, path)
    if not configs:
        raise ValueError(f"no GEMM config fits capability {capability} with {elem_size}-byte elements")

    def tiles(c: TileConfig) -> int:
        return triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n)

    first = next((c for c in configs if tiles(c) >= num_sms), None) or max(configs, key=tiles)
    return [first] + [c for c in configs if c != first]


def select_config(
    M: int,
    N: int,
    K: int,
    elem_size: int,
    capability: tuple[int, int] | None,
    num_sms: int,
    out_elem_size: int | None = None,
    path: str = "pointer",
) -> TileConfig:
    """Deterministic pick: the regime's first fitting config with at least one tile per SM, else the one
    with most tiles. ``capability=None`` means the CPU interpreter and returns :data:`INTERPRETER_CONFIG`.
    """
    if capability is None:
        return INTERPRETER_CONFIG
    return candidate_configs(M, N, K, elem_size, capability, num_sms, out_elem_size, path)[0]


# ----------------------------------------------------------------------------------------- autotuning

AUTOTUNE = os.environ.get("ODYKERNELS_AUTOTUNE", "1") != "0"
"""Time the candidate configs on a GPU the first time a shape key is seen (``ODYKERNELS_AUTOTUNE=0``: no)."""
_TUNED: dict[tuple, TileConfig] = {}


def tune_key(M: int, N: int, K: int, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, path: str) -> tuple:
    """The tuning cache key: M by power-of-two bucket (sequence lengths vary per batch), the rest exactly."""
    return (
        normalize_device(a.device), path, a.dtype, out_dtype, triton.next_power_of_2(M), N, K,
        a.stride(1) == 1, b.stride(0) == 1,
    )  # fmt: skip


def autotune(key: tuple, candidates: list[TileConfig], run, bench=None) -> TileConfig:
    """The fastest of ``candidates`` by ``bench(lambda: run(config))`` (ms; default ``triton.testing.do_bench``),
    cached under ``key``. A config that does not fit the card at launch (``OutOfResources``) is skipped.
    """
    if key in _TUNED:
        return _TUNED[key]
    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=5, rep=20)

    times = {}
    for cfg in candidates:
        try:
            times[cfg] = bench(lambda cfg=cfg: run(cfg))
        except triton.runtime.errors.OutOfResources:
            continue
    if not times:
        raise RuntimeError(f"autotune: no candidate config could run for {key}: {[str(c) for c in candidates]}")
    best = min(candidates, key=lambda c: times.get(c, float("inf")))  # ties: the earlier (preferred) one
    _TUNED[key] = best
    return best


def config_for(
    M: int,
    N: int,
    K: int,
    a: torch.Tensor,
    b: torch.Tensor,
    out_dtype: torch.dtype,
    kernel,
    path: str,
) -> TileConfig:
    """The config a launcher uses: the interpreter's on CPU; on a GPU the tuned one when autotuning is on
    (timed with :func:`matmul` on ``a``, ``b`` and a scratch output: the fused kernels share its inner
    loop, and cannot be run for timing themselves), else the deterministic pick."""
    device = a.device
    if is_interpreted(kernel, device):
        return INTERPRETER_CONFIG
    capability, num_sms = device_info(normalize_device(device))
    candidates = candidate_configs(M, N, K, a.element_size(), capability, num_sms, out_dtype.itemsize, path)
    if len(candidates) == 1 or not AUTOTUNE or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    key = tune_key(M, N, K, a, b, out_dtype, path)
    if key not in _TUNED:
        scratch = torch.empty((M, N), dtype=out_dtype, device=device)
        return autotune(key, candidates, lambda cfg: prepare_matmul(a, b, scratch, config=cfg, path=path).run())
    return _TUNED[key]


# ----------------------------------------------------------------------------------------- checks


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 operands follow torch's TF32 switch; 16-bit operands ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_operands(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[int, int, int]:
    """Raise ``ValueError`` unless ``a`` [M, K] and ``b`` [K, N] can be multiplied by the GEMM kernels;
    returns ``(M, N, K)``."""
    for name, t in (("a", a), ("b", b)):
        if t.dim() != 2:
            raise ValueError(f"{what}: {name} must be 2-D, got shape {list(t.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{what}: inner dimensions differ: a is {list(a.shape)} (K={a.shape[1]}), "
            f"b is {list(b.shape)} (K={b.shape[0]})"
        )
    if a.dtype != b.dtype:
        raise ValueError(f"{what}: a is {a.dtype} but b is {b.dtype}; expected the same dtype")
    if a.device != b.device:
        raise ValueError(f"{what}: a is on {a.device} but b is on {b.device}; expected the same device")
    check_dtype(a.dtype, a.device, f"{what}: a")
    if max(a.shape[0], a.shape[1], b.shape[1]) >= 2**31:
        raise ValueError(f"{what}: a dimension of {list(a.shape)} x {list(b.shape)} reaches 2**31")
    return a.shape[0], b.shape[1], a.shape[1]


def check_dtype(dtype: torch.dtype, device: torch.device, what: str) -> None:
    """Raise ``ValueError`` for a dtype the kernels do not handle on ``device``."""
    check_supported_device(device, what)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what} has dtype {dtype}; expected one of {list(SUPPORTED_DTYPES)}")
    if device.type == "cpu" and dtype == torch.bfloat16:
        # Measured with triton 3.7.1: the interpreter returns silently wrong bf16 dot products.
        raise ValueError(f"{what} is bfloat16 on the CPU interpreter, which computes bf16 wrongly; use fp16/fp32")


def check_out(out: torch.Tensor, shape: tuple[int, int], device: torch.device, what: str) -> None:
    """Raise ``ValueError`` unless ``out`` has ``shape``, sits on ``device`` and has a supported dtype."""
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{what}: out has shape {list(out.shape)}, expected {list(shape)}")
    if out.device != device:
        raise ValueError(f"{what}: out is on {out.device}, expected {device}")
    check_dtype(out.dtype, device, f"{what}: out")


def out_tensor(
    out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, what: str
) -> torch.Tensor:
    """``out`` once :func:`check_out` accepts it, or a new (uninitialized) tensor of ``shape`` and ``dtype``."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_out(out, shape, device, what)
    return out


def _major(t: torch.Tensor, name: str) -> tuple[bool | None, str]:
    """(True if column-major / False if row-major / None if neither is TMA-loadable, why not)."""
    es = t.element_size()
    if t.data_ptr() % 16:
        return None, f"{name} starts at an address that is not 16-byte aligned ({t.data_ptr() % 16} bytes off)"
    if t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0:
        return False, ""
    if t.stride(0) == 1 and (t.stride(1) * es) % 16 == 0:
        return True, ""
    return None, (
        f"{name} has strides {tuple(t.stride())} ({es}-byte elements); TMA needs one unit stride and the other "
        f"a multiple of 16 bytes"
    )


def tma_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[bool | None, bool | None, str]:
    """(A column-major?, B K-contiguous?, why not) for the TMA path; None where it cannot load the operand."""
    a_col, why_a = _major(a, "a")
    b_kcontig, why_b = _major(b, "b")  # B "column-major" = K contiguous
    if a.shape[1] == 0:
        return None, None, "K is 0 (a tensor descriptor cannot span an empty dimension)"
    return a_col, b_kcontig, why_a or why_b


def choose_path(a: torch.Tensor, b: torch.Tensor, kernel, path: str | None, what: str) -> str:
    """The code path for these operands: ``path`` if given (checked), else "tma" on sm_90+ when the operands
    are TMA-loadable, else "pointer". Under the interpreter the default is "pointer" (tests pick "tma").
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"{what}: path={path!r}; expected one of {list(PATHS)} or None (automatic)")
    if path == "pointer":
        return path
    interpreted = is_interpreted(kernel, a.device)
    capability = None if interpreted else device_info(normalize_device(a.device))[0]
    a_col, b_kcontig, why = tma_layout(a, b)
    if path == "tma":
        if capability is not None and capability < (9, 0):
            raise ValueError(
                f"{what}: path='tma' needs sm_90 or newer; {a.device} is sm_{capability[0]}{capability[1]}"
            )
        if a_col is None or b_kcontig is None:
            raise ValueError(f"{what}: path='tma' cannot load these operands: {why}")
        return path
    if interpreted or capability < (9, 0) or a_col is None or b_kcontig is None:
        return "pointer"
    return "tma"


def descriptors(a: torch.Tensor, b: torch.Tensor, cfg: TileConfig) -> tuple[TensorDescriptor, TensorDescriptor, dict]:
    """Host tensor descriptors of A and B for ``cfg`` and the layout constexprs of the TMA kernels."""
    a_col, b_kcontig, _ = tma_layout(a, b)
    (M, K), N = a.shape, b.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if a_col:
        a_desc = TensorDescriptor(a, [K, M], [a.stride(1), 1], [bk, bm])
    else:
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, bk])
    if b_kcontig:
        b_desc = TensorDescriptor(b, [N, K], [b.stride(1), 1], [bn, bk])
    else:
        b_desc = TensorDescriptor(b, [K, N], [b.stride(0), 1], [bk, bn])
    return a_desc, b_desc, {"A_COL_MAJOR": bool(a_col), "B_K_CONTIGUOUS": bool(b_kcontig)}


def out_vec(out: torch.Tensor, cols: int) -> int:
    """Elements per 128-bit store of ``out`` when its rows allow them (address, row stride and the column
    count all multiples of 16 bytes, unit column stride), else 1 (the stores then follow what the JIT's
    own specialization proves)."""
    es = out.element_size()
    vec = 16 // es
    aligned = out.data_ptr() % 16 == 0 and (out.stride(0) * es) % 16 == 0 and cols % vec == 0
    return vec if aligned and out.stride(1) == 1 else 1


# ----------------------------------------------------------------------------------------- launcher


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """What the GEMM launchers (matmul, ag_matmul, matmul_rs) share once the code path and config are chosen.

    The kernels' arguments start with the two operands (:attr:`operands`: A and B, or their TMA
    descriptors) and, after the sizes, A's and B's strides (:attr:`strides`: empty on the TMA path, whose
    descriptors carry them); :attr:`constexprs` holds the tile constexprs and launch options of both paths
    (``BLOCK_*``, ``GROUP_M``, ``INPUT_PRECISION``, ``num_warps``, ``num_stages``) and the path's own
    (``EVEN_K``, or ``A_COL_MAJOR`` and ``B_K_CONTIGUOUS``).
    """

    kernel: JITFunction
    path: str
    cfg: TileConfig
    device: torch.device
    N: int
    interpreted: bool
    operands: tuple
    strides: tuple
    constexprs: dict

    def launch(
        self, m_tiles: int, args: tuple, out: torch.Tensor | None = None, max_programs: int | None = None, **constexprs
    ) -> Launch:
        """The persistent launch over ``m_tiles`` x N-tiles with ``args``, the plan's constexprs and ``constexprs``."""
        tiles = m_tiles * triton.cdiv(self.N, self.cfg.block_n)
        progs = num_programs(normalize_device(self.device), tiles, self.interpreted, max_programs)
        return Launch(self.kernel, self.device, (progs,), args, {**self.constexprs, **constexprs}, out)


def plan_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out_dtype: torch.dtype,
    kernels: tuple[JITFunction, JITFunction],
    path: str | None,
    what: str,
    config: TileConfig | None = None,
) -> GemmPlan:
    """The code path (:func:`choose_path`) and config (``config``, else :func:`config_for`) of ``a @ b`` into
    ``out_dtype``, for checked operands with M, N > 0; ``kernels`` is the (pointer, TMA) pair."""
    path = choose_path(a, b, kernels[1], path, what)
    kernel = kernels[1] if path == "tma" else kernels[0]
    (M, K), N = a.shape, b.shape[1]
    cfg = config or config_for(M, N, K, a, b, out_dtype, kernel, path)
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        INPUT_PRECISION=input_precision(a.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if path == "tma":
        a_desc, b_desc, layout = descriptors(a, b, cfg)
        operands, strides, constexprs = (a_desc, b_desc), (), {**constexprs, **layout}
    else:
        operands, strides = (a, b), (a.stride(0), a.stride(1), b.stride(0), b.stride(1))
        constexprs["EVEN_K"] = K % cfg.block_k == 0
    interpreted = is_interpreted(kernel, a.device)
    return GemmPlan(kernel, path, cfg, a.device, N, interpreted, operands, strides, constexprs)


def prepare_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    config: TileConfig | None = None,
    path: str | None = None,
) -> Launch:
    """Check the arguments of :func:`matmul` and configure its launch (run it with ``.run()``).

    ``config`` overrides the config choice (benchmarks, the autotuner); ``path`` the code path.
    """
    what = "matmul"
    M, N, K = check_operands(a, b, what)
    out = out_tensor(out, (M, N), a.dtype, a.device, what)
    if M == 0 or N == 0:
        return Launch(None, a.device, out=out)
    if K == 0:
        return Launch(None, a.device, out=out.zero_())
    plan = plan_gemm(a, b, out.dtype, (_matmul_kernel, _matmul_tma_kernel), path, what, config)
    args = (*plan.operands, out, M, N, K, *plan.strides, out.stride(0), out.stride(1))
    return plan.launch(triton.cdiv(M, plan.cfg.block_m), args, out, OUT_VEC=out_vec(out, N))


def matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, *, path: str | None = None
) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation.

    Args:
        a: (M, K), bf16/fp16/fp32, any strides.
        b: (K, N), same dtype and device as ``a``, any strides.
        out: optional (M, N) output, any supported dtype (default: ``a``'s dtype), any strides.
        path: ``"tma"`` or ``"pointer"`` to force a code path (default: chosen from the card and the
            operands' alignment, see :func:`choose_path`).

    Returns:
        (M, N) tensor ``out``.
    """
    return prepare_matmul(a, b, out, path=path).run()
