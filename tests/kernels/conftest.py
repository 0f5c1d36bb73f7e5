"""Triton's interpreter reads ``TRITON_INTERPRET`` when ``@triton.jit``
decorates a function, Triton's own ``tl.max`` / ``tl.sum`` included (at
``import triton``), so it must be set before anything in the process imports
Triton.  This group runs in its own process (``tests/run.py`` also sets the
variable); set here too, so ``pytest tests/kernels`` works alone.  The AOT
compile checks strip it in their child processes."""

import os

os.environ["TRITON_INTERPRET"] = "1"
