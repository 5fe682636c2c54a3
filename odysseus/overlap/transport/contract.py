"""The preconditions of the CUDA-only calls the symm backend makes, as checks both transports run.

Each check mirrors a ``TORCH_CHECK`` of torch 2.11 (the GPU image's release) with its message, cited with
file and line; where 2.14 is stricter, the stricter rule. docs/SYMM_CONTRACT.md has the full record, per
torch release. ``TORCH_CHECK`` failures reach Python as ``RuntimeError``, so these raise that too: code
that passes on the emulated runtime does not fail the same check on its first CUDA call.
"""

from __future__ import annotations

import math

import torch

from . import FLAG_DTYPE

SIGNAL_PAD_BYTES = 9216
"""torch 2.11's default signal pad per rank and allocation (``get_signal_pad_size()``, SYMM_CONTRACT §1)."""


def check_write_value32(flags: torch.Tensor, offset: int, value: int, count: int | None = None) -> None:
    """``_SymmetricMemory.stream_write_value32(input, offset, val)``, or ``memset32(..., count)`` with ``count``.

    torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemoryOps.cu (2.11 lines 1169-1188 for
    ``stream_write_value32_``, 1112-1135 for ``memset32_``; SYMM_CONTRACT §6-7), in this order.
    """
    op = "stream_write_value32_" if count is None else "memset32_"
    if flags.dim() != 1 or not flags.is_contiguous() or flags.dtype != FLAG_DTYPE:
        raise RuntimeError(
            f"symm_mem::{op}: input must be a flat, contiguous uint32 tensor. (got {flags.dtype} of shape "
            f"{list(flags.shape)}, strides {flags.stride()})"
        )
    if offset < 0:
        raise RuntimeError(f"symm_mem::{op}: offset must be greater than or equal to 0 (got {offset})")
    if count is not None and count <= 0:
        raise RuntimeError(f"symm_mem::{op}: count must be a positive integer (got {count})")
    if not 0 <= value <= 2**32 - 1:
        raise RuntimeError(f"symm_mem::{op}: val must be in the range of [0, 4294967295] (uint32_t). (got {value})")
    end = offset + (1 if count is None else count)
    if end > flags.numel():
        what = f"offset ({offset})" if count is None else f"offset + count ({end})"
        raise RuntimeError(f"symm_mem::{op}: {what} exceeded the numel of the input ({flags.numel()})")


def check_get_buffer(
    rank: int, world: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int, buffer_bytes: int
) -> int:
    """``_SymmetricMemory.get_buffer(rank, sizes, dtype, storage_offset)``; returns the element count.

    torch/csrc/distributed/c10d/symm_mem/SymmetricMemory.cpp, ``get_buffer_at_byte_offset`` (2.11 lines
    366 and 380; SYMM_CONTRACT §3): ``Invalid peer rank`` unless ``0 <= rank < world``, and
    ``storage_offset * esize + prod(sizes) * esize <= buffer_size``. torch does not check that the offset is
    non-negative (a negative one wraps around as size_t); this does.
    """
    if not 0 <= rank < world:
        raise RuntimeError(f"Invalid peer rank: {rank} (world size {world})")
    if offset < 0:
        raise RuntimeError(f"SymmetricMemory::get_buffer: storage_offset must be non-negative (got {offset})")
    count = math.prod(shape)
    required = (count + offset) * dtype.itemsize
    if required > buffer_bytes:
        raise RuntimeError(
            f"SymmetricMemory::get_buffer: the requested size ({required} bytes) exceeds the allocated size "
            f"({buffer_bytes} bytes)"
        )
    return count


def check_rendezvous_sizes(nbytes: list[int]) -> None:
    """Every rank's allocation has the same byte size.

    CUDASymmetricMemory.cu, ``validate_rendezvous_requests`` (2.11 lines 481-483; SYMM_CONTRACT §2):
    ``TORCH_CHECK(reqs[r].buffer_size == reqs[0].buffer_size)`` for every rank.
    """
    if any(n != nbytes[0] for n in nbytes):
        raise RuntimeError(
            f"Expected reqs[r].buffer_size == reqs[0].buffer_size to be true, but got false: the ranks allocated "
            f"{nbytes} bytes; symmetric memory needs the same size on every rank"
        )


def check_memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A pull must be a plain memcpy, so CUDA runs it on a copy engine and not on the SMs.

    Not a check of torch's, a behaviour the backend relies on: aten/src/ATen/native/cuda/Copy.cu,
    ``copy_kernel_cuda`` turns only a ``memcpy_eligible`` copy (same dtype, no conjugate or negative bit,
    every operand contiguous) into ``cudaMemcpyAsync``; any other copy is an elementwise kernel, which
    would queue behind the persistent GEMM that waits for it.
    """
    if dst.dtype != src.dtype or dst.shape != src.shape:
        raise RuntimeError(
            f"pull: source {src.dtype} {list(src.shape)} and destination {dst.dtype} {list(dst.shape)} must have "
            "the same dtype and shape"
        )
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise RuntimeError(
            f"pull: source strides {src.stride()} and destination strides {dst.stride()} must both be contiguous, "
            "or the copy runs as a kernel on the SMs instead of the copy engine"
        )
    if dst.is_conj() or src.is_conj() or dst.is_neg() or src.is_neg():
        raise RuntimeError("pull: conjugate or negative views are not plain memcpy copies")
