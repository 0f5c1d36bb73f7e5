"""Run a ``@triton.jit`` kernel in whichever mode Triton is in at launch time.

Triton decides between compiling and interpreting (``TRITON_INTERPRET=1``)
when ``@triton.jit`` decorates a function, i.e. when this package is imported.
A process that imported the kernels before the variable was set (a test
session collecting several files, say) would otherwise be stuck with the mode
of the first import.  :func:`launchable` re-wraps the kernel's Python function
when the modes differ, so the mode is read at each launch instead.

Deciding whether a launch goes to Triton (:func:`use_triton`) does not import
Triton: the quantizer's CPU path, which the scheduler's storage arithmetic
sits beside, never loads it.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch

_CACHE: dict[tuple[int, bool], object] = {}
# While :func:`vllm_kvshrink.kernels.aot.record_launches` is active: the list
# that launches are appended to instead of running.
_RECORD: list | None = None


class Launch(NamedTuple):
    """One kernel launch as the host wrapper issued it (for ahead-of-time
    compilation): the kernel, its grid, and its arguments."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            _RECORD.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return record


def recording() -> bool:
    """Whether launches are being recorded for a GPU (nothing runs)."""
    return _RECORD is not None


def targets_gpu(t: torch.Tensor) -> bool:
    """Whether a launch for ``t`` should use the GPU configuration: CUDA
    tensors, or any tensor while launches are recorded for a GPU."""
    return t.is_cuda or recording()


def interpreting() -> bool:
    """Whether Triton kernels launched now run in the CPU interpreter."""
    if recording():
        return False
    # Before Triton is imported its knobs are unset: the variable decides.
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only when interpreting."""
    return t.is_cuda or interpreting() or recording()


def launchable(kernel):
    """``kernel`` (a ``@triton.jit`` function) in the mode Triton is in now:
    ``launchable(k)[grid](*args)`` runs it (or records it, see
    :func:`recording`)."""
    if recording():
        return _Recorder(kernel)
    interpret = interpreting()
    key = (id(kernel), interpret)
    fn = _CACHE.get(key)
    if fn is None:
        import triton
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(kernel, InterpretedFunction) == interpret:
            fn = kernel
        elif interpret:
            fn = InterpretedFunction(kernel.fn)
        else:
            fn = triton.runtime.jit.JITFunction(kernel.fn)
        _CACHE[key] = fn
    return fn
