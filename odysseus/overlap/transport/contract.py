"""The preconditions of the CUDA-only calls the symm backend makes, as checks both transports run.

Each check mirrors a ``TORCH_CHECK`` (or a behaviour the backend relies on) in torch's C++ source, cited
beside it. The CPU transport runs them before standing in for the call; the CUDA transport runs them too,
so a violation reads the same on both, before torch's own message.
"""

from __future__ import annotations

import math

import torch

from . import FLAG_DTYPE

SIGNAL_PAD_BYTES = 2048
"""torch's default signal pad per rank and allocation (``get_signal_pad_size()``)."""


def check_write_value32(flags: torch.Tensor, offset: int, value: int) -> None:
    """``_SymmetricMemory.stream_write_value32(input, offset, val)``.

    torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemoryOps.cu, ``stream_write_value32_``:
    ``TORCH_CHECK(input.dim() == 1 && input.is_contiguous() && input.dtype() == at::kUInt32, ...)``,
    ``TORCH_CHECK(offset >= 0 && offset < input.numel(), ...)`` and the value must fit in 32 unsigned bits.
    """
    if flags.dim() != 1 or not flags.is_contiguous() or flags.dtype != FLAG_DTYPE:
        raise ValueError(
            "stream_write_value32: input must be a flat, contiguous uint32 tensor; got "
            f"{flags.dtype} of shape {list(flags.shape)} and strides {flags.stride()}"
        )
    if not 0 <= offset < flags.numel():
        raise ValueError(f"stream_write_value32: offset {offset} is out of range for {flags.numel()} flags")
    if not 0 <= value < 2**32:
        raise ValueError(f"stream_write_value32: value {value} does not fit in 32 unsigned bits")


def check_get_buffer(
    rank: int, world: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int, buffer_bytes: int
) -> int:
    """``_SymmetricMemory.get_buffer(rank, sizes, dtype, storage_offset)``; returns the element count.

    torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.cu, ``CUDASymmetricMemory::get_buffer``:
    ``TORCH_CHECK(rank < world_size_, ...)`` and
    ``TORCH_CHECK(req_size <= buffer_size_, ...)`` with ``req_size = (numel + storage_offset) * element_size``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"get_buffer: rank {rank} out of range for world size {world}")
    if offset < 0 or any(s < 0 for s in shape):
        raise ValueError(f"get_buffer: negative size or offset (shape {list(shape)}, offset {offset})")
    count = math.prod(shape)
    required = (count + offset) * dtype.itemsize
    if required > buffer_bytes:
        raise ValueError(
            f"get_buffer: the requested size ({required} bytes) exceeds the allocated size ({buffer_bytes} bytes)"
        )
    return count


def check_barrier_channel(channel: int, world: int) -> None:
    """``_SymmetricMemory.barrier(channel, timeout_ms)``.

    torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.cu, ``check_channel``:
    ``TORCH_CHECK(channel >= 0, ...)`` and ``channel < signal_pad_size / sizeof(uint32_t) / world_size``
    (every channel holds one uint32 signal per peer).
    """
    channels = SIGNAL_PAD_BYTES // 4 // world
    if not 0 <= channel < channels:
        raise ValueError(f"barrier: channel {channel} out of range; the signal pad holds {channels} channels")


def check_memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A pull must be a plain memcpy, so CUDA runs it on a copy engine and not on the SMs.

    aten/src/ATen/native/cuda/Copy.cu, ``copy_kernel_cuda``: only a ``memcpy_eligible`` copy (same dtype,
    no conjugate/negative bit, every operand contiguous) becomes ``cudaMemcpyAsync``; any other copy is an
    elementwise kernel, which would wait behind the persistent GEMM that waits for it.
    """
    if dst.dtype != src.dtype or dst.shape != src.shape:
        raise ValueError(
            f"pull: source {src.dtype} {list(src.shape)} and destination {dst.dtype} {list(dst.shape)} must have "
            "the same dtype and shape"
        )
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError(
            f"pull: source strides {src.stride()} and destination strides {dst.stride()} must both be contiguous, "
            "or the copy runs as a kernel on the SMs instead of the copy engine"
        )
    if dst.is_conj() or src.is_conj() or dst.is_neg() or src.is_neg():
        raise ValueError("pull: conjugate or negative views are not plain memcpy copies")
