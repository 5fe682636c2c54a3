"""Measure what a forward pass keeps for backward, and time steps."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def ody_range(name: str) -> Iterator[None]:
    """A named range (``ody/ag_matmul``, ``ody/attn``...) for torch.profiler traces and, on CUDA, NVTX (nsys).

    Inside ``torch.compile`` it is a no-op: compiled graphs carry no Python-level ranges.
    """
    if torch.compiler.is_compiling():
        yield
        return
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


class SavedActivations:
    """Context manager that counts the bytes autograd saves for backward, parameters excluded.

    Each storage is counted once however many saved tensors view it. ``peak_bytes`` is the total saved
    by the time the block is left, which is the activation memory held between forward and backward.

    >>> with SavedActivations(model) as saved:
    ...     loss = model(x).sum()
    >>> saved.peak_bytes
    """

    def __init__(self, *modules: nn.Module):
        # FSDP2 parameters are DTensors: their storage is the local shard's. Weights it gathers for the
        # forward and autograd saves count as activations, which is what they cost between the passes.
        self._params = {
            getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for m in modules for p in m.parameters()
        }
        self._seen: set[int] = set()
        self.peak_bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and ptr not in self._seen and t.device.type != "meta":
            self._seen.add(ptr)
            self.peak_bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def median_time(step: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``step()`` over ``repeats`` runs after ``warmup`` runs.

    On CUDA, the device is synchronised around each run so the time covers the kernels.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
