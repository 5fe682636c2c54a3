"""The real runtime: one torch call per method (torch.cuda streams and events, torch symmetric memory).

Cannot run on a machine without a GPU: tests reach it only through the GPU tests (``pytest -m gpu``). Each
call's contract, read in torch's source, is in docs/SYMM_CONTRACT.md (sections cited per method); the
transport checks it (:mod:`.contract`) before calling.
"""

from __future__ import annotations

import torch

from .runtime import Runtime


class CudaRuntime(Runtime):
    """``torch.cuda`` on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def device_id(self) -> int:
        return self.device.index

    def can_access_peer(self, device: int, peer: int) -> bool:
        return torch.cuda.can_device_access_peer(device, peer)

    def check_symmetric_memory(self) -> None:
        from torch.distributed._symmetric_memory import _SymmetricMemory

        if not hasattr(_SymmetricMemory, "stream_write_value32"):  # torch >= 2.6 (SYMM_CONTRACT §6)
            raise RuntimeError(f"torch {torch.__version__} lacks _SymmetricMemory.stream_write_value32")
        self.symm_empty(1, torch.uint8)  # a local allocation: no peer involved

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)

    def record_event(self, stream) -> torch.cuda.Event:
        return stream.record_event()

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)

    def wait_stream(self, stream, other) -> None:
        stream.wait_stream(other)

    def synchronize(self, stream, timeout_s: float) -> None:
        stream.synchronize()  # CUDA has no bounded host wait; the kernels bound their own waits

    def hand_off(self, timeout_s: float) -> None:
        pass  # the host's next torch ops are queued on the current stream, after its work

    def is_capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def symm_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        import torch.distributed._symmetric_memory as symm_mem

        return symm_mem.empty(numel, dtype=dtype, device=self.device)  # SYMM_CONTRACT §1

    def rendezvous(self, tensor: torch.Tensor, pg):
        import torch.distributed._symmetric_memory as symm_mem

        return symm_mem.rendezvous(tensor, pg.group_name)  # §2: None, not an error, where it cannot map

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)  # contiguous and same dtype (contract.check_memcpy): cudaMemcpyAsync on a copy engine

    def stream_write_value32(self, flags: torch.Tensor, index: int, value: int) -> None:
        from torch.distributed._symmetric_memory import _SymmetricMemory

        _SymmetricMemory.stream_write_value32(flags, index, value)  # §6: cuStreamWriteValue32, fenced

    def memset32(self, flags: torch.Tensor, index: int, value: int, count: int) -> None:
        from torch.distributed._symmetric_memory import _SymmetricMemory

        _SymmetricMemory.memset32(flags, index, value, count)  # §7

    def sleep(self, seconds: float) -> None:
        torch.cuda._sleep(int(seconds * 2e9))  # cycles at about 2 GHz

    def launch(self, launch, guards=(), pushes=()) -> None:
        launch.run()  # Triton launches on the current stream; guards and pushes annotate the emulated runtime
