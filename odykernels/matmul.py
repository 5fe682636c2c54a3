"""Persistent tiled GEMM ``C = A @ B`` and the tile helpers the fused kernels share.

One program per SM walks output tiles ``pid, pid + P, pid + 2P, ...`` in grouped order (``GROUP_M``
M-tiles side by side sweep N together, so their A rows and B columns stay in L2). The K loop of one
tile lives in :func:`tile_dot`, which ``ag_matmul`` and ``matmul_rs`` call as well.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from odykernels._runtime import (
    check_supported_device,
    device_info,
    is_interpreted,
    launchable,
    normalize_device,
    num_programs,
)


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of linear ``tile`` when ``GROUP_M`` M-tiles at a time sweep all N-tiles."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_m
    pid_n = (tile % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def tile_dot(
    a_ptr,
    b_ptr,
    rows,
    cols,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``A[rows, :K] @ B[:K, cols]``.

    ``rows`` (``[BLOCK_M]``) and ``cols`` (``[BLOCK_N]``) must all be valid indices: callers wrap the tail
    of a partial tile back onto valid rows/columns (and drop those results on store), so only the K tail
    needs a mask and the loads stay unmasked, vectorized and pipelined.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    # int64 steps: a column-major operand has a K stride of M rows, times BLOCK_K may pass 2**31.
    a_step = tl.full([], BLOCK_K, tl.int64) * stride_ak
    b_step = tl.full([], BLOCK_K, tl.int64) * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def wrapped_cols(pid_n, N, BLOCK_N: tl.constexpr):
    """Columns of N-tile ``pid_n`` (``[BLOCK_N]``), those past ``N`` wrapped onto valid ones for loading.

    ``% N`` rather than a clamp: the compiler derives contiguity from N's divisibility through a
    remainder (not through a minimum), which keeps B's loads vectorized and asynchronous.
    """
    return (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N


@triton.jit
def store_tile(c_ptr, acc, rows, cols, row_end, N, stride_cm, stride_cn):
    """Store ``acc`` to ``C[rows, cols]`` in C's dtype, skipping rows ``>= row_end`` and cols ``>= N``."""
    mask = (rows[:, None] < row_end) & (cols[None, :] < N)
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tile_dot(
            a_ptr, b_ptr, rows % M, wrapped_cols(pid_n, N, BLOCK_N), K, stride_am, stride_ak, stride_bk, stride_bn,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION,
        )  # fmt: skip
        store_tile(c_ptr, acc, rows, cols, M, N, stride_cm, stride_cn)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of the GEMM kernels (matmul, ag_matmul, matmul_rs)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def smem_bytes(self, elem_size: int) -> int:
        """Shared memory of the pipelined A and B tiles (the dominant term of the kernel's use)."""
        return self.num_stages * (self.block_m * self.block_k + self.block_k * self.block_n) * elem_size


# GPU configs, most preferred first. None of them has been timed by this project yet (no GPU so far): the
# first is the Triton persistent-matmul tutorial's choice for H100 bf16 (128x256x64, 8 warps, 3 stages,
# 144 KiB of shared memory); the smaller ones give enough tiles to fill the SMs on small problems.
CONFIGS: list[TileConfig] = [
    TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
    TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
    TileConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4),
    TileConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=4),
]

# Interpreter only: every tl.dot costs about 7 ms on the CPU whatever its size, and tests run tiny shapes,
# so the smallest legal dot (16x16x16) keeps them fast while a 2-wide group still exercises the ordering.
INTERPRETER_CONFIG = TileConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1)

# Largest dynamic shared memory per block, bytes, by compute capability (CUDA programming guide).
SMEM_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}
SMEM_LIMIT_DEFAULT = 101376

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def prune_configs(
    configs: list[TileConfig], M: int, N: int, K: int, elem_size: int, capability: tuple[int, int]
) -> list[TileConfig]:
    """Configs that fit the card's shared memory and are not taller than the problem needs.

    A config whose ``block_m`` exceeds M rounded up to a power of two only computes padding rows; it is
    kept when nothing smaller is left, so the result is never empty for sizes the launcher accepts.
    """
    limit = SMEM_LIMIT.get(tuple(capability), SMEM_LIMIT_DEFAULT)
    fits = [c for c in configs if c.smem_bytes(elem_size) <= limit]
    tall_enough = [c for c in fits if c.block_m <= max(16, triton.next_power_of_2(M))]
    return tall_enough or fits[-1:]


def select_config(
    M: int, N: int, K: int, elem_size: int, capability: tuple[int, int] | None, num_sms: int
) -> TileConfig:
    """Deterministic pick: the first pruned config with at least one tile per SM, else the one with most.

    ``capability=None`` means the CPU interpreter and returns :data:`INTERPRETER_CONFIG`.
    """
    if capability is None:
        return INTERPRETER_CONFIG
    candidates = prune_configs(CONFIGS, M, N, K, elem_size, capability)
    if not candidates:
        raise ValueError(f"no GEMM config fits capability {capability} with {elem_size}-byte elements")

    def tiles(c: TileConfig) -> int:
        return triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n)

    for c in candidates:
        if tiles(c) >= num_sms:
            return c
    return max(candidates, key=tiles)


def config_for(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, kernel) -> TileConfig:
    """The config a launcher uses for this problem on ``device`` (interpreter config on CPU)."""
    if is_interpreted(kernel, device):
        return INTERPRETER_CONFIG
    capability, num_sms = device_info(normalize_device(device))
    return select_config(M, N, K, dtype.itemsize, capability, num_sms)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 operands follow torch's TF32 switch; 16-bit operands ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_operands(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` unless ``a`` [M, K] and ``b`` [K, N] can be multiplied by the GEMM kernels."""
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


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation.

    Args:
        a: (M, K), bf16/fp16/fp32, any strides.
        b: (K, N), same dtype and device as ``a``, any strides.
        out: optional (M, N) output, any supported dtype (default: ``a``'s dtype), any strides.

    Returns:
        (M, N) tensor ``out``.
    """
    check_operands(a, b, "matmul")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    else:
        check_out(out, (M, N), a.device, "matmul")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    kernel = launchable(_matmul_kernel, a.device)
    cfg = config_for(M, N, K, a.dtype, a.device, _matmul_kernel)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    progs = num_programs(normalize_device(a.device), tiles, is_interpreted(_matmul_kernel, a.device))
    kernel[(progs,)](
        a, b, out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=K % cfg.block_k == 0, INPUT_PRECISION=input_precision(a.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
