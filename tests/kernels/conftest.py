"""The kernels group: Triton's kernels run in its CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function:
this package's kernels at their import (the package re-reads the variable at
each launch, ``kernels._launch``), but also Triton's own ``tl.max`` /
``tl.sum`` ... at ``import triton``.  So it must be set before anything in the
process imports Triton: here, before any test module of the group is
imported, and by ``tests/run.py``, which runs the group in its own process
(a process that imported vLLM has imported Triton already).  The AOT compile
checks strip it in their child processes.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture
def triton_interpreter():
    """For tests that launch Triton kernels: fails, saying why, where Triton
    was imported before the interpreter was switched on."""
    import torch
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    from vllm_kvshrink.kernels._launch import interpreting, use_triton

    if not isinstance(triton.language.standard.max, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: run the "
                    "kernels group in its own process (python tests/run.py kernels)")
    assert interpreting() and use_triton(torch.empty(0))


@pytest.fixture
def ext(monkeypatch):
    """The C++ kernels, beside the quantizer's PyTorch path (what a CPU engine
    runs; the group's Triton interpreter would only make the reference slow)."""
    from vllm_kvshrink.kernels import _launch, cpu_ext

    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    if not cpu_ext.load():
        pytest.fail(f"the C++ kernel did not build: {cpu_ext.unavailable_reason()}")
    return cpu_ext
