"""Run a ``@triton.jit`` kernel in whichever mode Triton is in at launch time.

Triton decides between compiling and interpreting (``TRITON_INTERPRET=1``)
when ``@triton.jit`` decorates a function, i.e. when this package is imported.
A process that imported the kernels before the variable was set (a test
session collecting several files, say) would otherwise be stuck with the mode
of the first import.  :func:`launchable` re-wraps the kernel's Python function
when the modes differ, so the mode is read at each launch instead.
"""

from __future__ import annotations

import os

import torch
import triton

_CACHE: dict[tuple[int, bool], object] = {}


def interpreting() -> bool:
    """Whether Triton kernels launched now run in the CPU interpreter."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only when interpreting."""
    return t.is_cuda or interpreting()


def launchable(kernel):
    interpret = interpreting()
    key = (id(kernel), interpret)
    fn = _CACHE.get(key)
    if fn is None:
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(kernel, InterpretedFunction) == interpret:
            fn = kernel
        elif interpret:
            fn = InterpretedFunction(kernel.fn)
        else:
            fn = triton.runtime.jit.JITFunction(kernel.fn)
        _CACHE[key] = fn
    return fn
