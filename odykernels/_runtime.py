"""Where a kernel runs: compiled on a CUDA device, or through Triton's interpreter for CPU tensors.

Triton picks interpreter or compiler once, when ``@triton.jit`` decorates, from ``TRITON_INTERPRET``,
and only if it is set before ``triton`` itself is imported (``tl.zeros`` and ``tl.cdiv`` are jit
functions too). A process-wide switch would also turn every kernel of a GPU test into an interpreted one.
So each launcher asks :func:`launchable` for the right object per call: CPU tensors get an interpreted
twin built from the same Python function, CUDA tensors the compiled kernel. With ``TRITON_INTERPRET=1``
set early the kernels are already interpreted and launch as they are (with the same index fix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Callable

import torch
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from odykernels import _interpret

# The interpreter runs programs one after another; a few programs per grid are enough to exercise the
# persistent loops (each program takes several tiles) without paying for many.
CPU_PROGRAMS = 3

_twins: dict[JITFunction, InterpretedFunction] = {}


def _interpreted(kernel: JITFunction) -> InterpretedFunction:
    """The interpreted twin of ``kernel``; helpers it calls are twinned too, through a copy of its globals."""
    twin = _twins.get(kernel)
    if twin is not None:
        return twin
    fn = kernel.fn
    scope = dict(fn.__globals__)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__module__ = fn.__module__
    clone.__qualname__ = fn.__qualname__
    twin = InterpretedFunction(clone)
    # Registered before the recursion so helpers that refer back to each other terminate.
    _twins[kernel] = twin
    for name, value in scope.items():
        if isinstance(value, JITFunction):
            scope[name] = _interpreted(value)
    return twin


def _patch_index(patch_tensor):
    """Wrap the interpreter's tensor patching so ``range(tensor)`` converts 1-element arrays with ``.item()``.

    Triton 3.6's interpreter calls ``int()`` on a 1-element 1-D array, an error from NumPy 2.4 on (3.7
    squeezes first); kernels loop over runtime bounds, so without this they fail there.
    """

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    return patched


@contextlib.contextmanager
def _stdlib_twins():
    """Swap triton.language's own jit functions (``tl.zeros``, ``x.sum()``...) for twins during a launch."""
    saved = [(interpreter, "_patch_lang_tensor", interpreter._patch_lang_tensor)]
    interpreter._patch_lang_tensor = _patch_index(interpreter._patch_lang_tensor)
    for owner in (tl, tl.tensor):
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                saved.append((owner, name, value))
                setattr(owner, name, _interpreted(value))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


class _InterpretedLaunch:
    """``twin[grid](...)`` with triton.language's jit functions twinned (and the index fix) during the run."""

    def __init__(self, twin: InterpretedFunction):
        _interpret.install()  # programs in any order, a yield per atomic, the host timer
        self.twin = twin

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            with _stdlib_twins():
                return self.twin[grid](*args, **kwargs)

        return run


def launchable(kernel, device: torch.device):
    """``kernel`` ready to launch with tensors on ``device`` (``kernel[grid](...)``)."""
    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 was set before triton was imported
        return _InterpretedLaunch(kernel)
    if device.type == "cpu":
        return _InterpretedLaunch(_interpreted(kernel))
    return kernel


def is_interpreted(kernel, device: torch.device) -> bool:
    """Whether launching ``kernel`` on ``device`` goes through the CPU interpreter."""
    return device.type == "cpu" or isinstance(kernel, InterpretedFunction)


@functools.cache
def device_info(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, number of SMs) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count


def num_programs(device: torch.device, num_tiles: int, interpreted: bool, limit: int | None = None) -> int:
    """Grid size of a persistent kernel: one program per SM (or :data:`CPU_PROGRAMS`), at most ``limit``
    and never more than tiles."""
    slots = CPU_PROGRAMS if interpreted else device_info(device)[1]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"max_programs={limit} must be >= 1")
        slots = min(slots, limit)
    return max(1, min(slots, num_tiles))


def check_supported_device(device: torch.device, what: str) -> None:
    """Raise unless ``device`` is CUDA or CPU (the interpreter)."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{what}: tensors on {device} are not supported; expected cuda (or cpu for the interpreter)")


def normalize_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so cached per-device values share one key."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclasses.dataclass
class Launch:
    """One kernel launch, checked and configured but not yet run: ``compile()`` now, ``run()`` later.

    The fused kernels wait on peers with a time bound, so a rank must not compile (seconds, the first
    time) between a barrier and its launch: a peer's wait would pay for it. Callers that sit behind a
    barrier prepare the launch, ``compile()`` it before the barrier and ``run()`` it after.
    """

    kernel: JITFunction | None
    """None when the problem is empty and there is nothing to run."""
    device: torch.device
    grid: tuple[int, ...] = ()
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    out: torch.Tensor | None = None
    """The tensor the kernel writes, when it has one to return."""
    verify: Callable[[], None] | None = None
    """Reads the launch's status record and raises ``TimeoutError`` if a wait gave up (kernels that wait)."""

    def compile(self) -> Launch:
        """Compile for these arguments without running (a no-op under the interpreter, which compiles nothing)."""
        if self.kernel is not None and not is_interpreted(self.kernel, self.device):
            self.kernel.warmup(*self.args, grid=self.grid, **self.kwargs)
        return self

    def run(self) -> torch.Tensor | None:
        """Enqueue the kernel (under the interpreter: run it to completion); returns :attr:`out`."""
        if self.kernel is not None:
            launchable(self.kernel, self.device)[self.grid](*self.args, **self.kwargs)
        return self.out

    def check(self) -> None:
        """Raise ``TimeoutError`` if a wait of this launch gave up (synchronizes with the device)."""
        if self.verify is not None:
            self.verify()


def run_checked(prepare: Callable[..., Launch], what: str, args: tuple, kwargs: dict, check: bool):
    """``prepare(*args, **kwargs).run()``, then (``check``) its timeout check: the plain launcher of a kernel
    that waits. ``check=False`` needs the caller's ``status`` record, to check later."""
    if not check and kwargs.get("status") is None:
        raise ValueError(f"{what}: check=False needs a status tensor to record timeouts in")
    launch = prepare(*args, **kwargs)
    out = launch.run()
    if check:
        launch.check()
    return out
