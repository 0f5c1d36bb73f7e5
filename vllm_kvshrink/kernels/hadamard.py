"""Orthonormal Hadamard rotation of each head's channels.

``x @ H`` with ``H = hadamard(D) / sqrt(D)`` (Sylvester's construction, ``D``
a power of two) spreads a few large channels over all of them, so a shared
scale wastes fewer levels on outliers (QuaRot arXiv:2404.00456, QuIP#
arXiv:2402.04396).  ``H`` is orthonormal and symmetric: ``(x @ H) @ H = x``,
and attention scores are unchanged when queries get the same rotation.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from vllm_kvshrink.kernels import cpu_lib


@lru_cache(maxsize=8)
def _matrix(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


def hadamard(d: int, device=None) -> torch.Tensor:
    """``[d, d]`` float32 orthonormal Hadamard matrix; ``d`` a power of two."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"head_dim={d} is not a power of two; the Hadamard "
                         f"rotation (forms ending in '_rot') needs one")
    return _matrix(d).to(device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` rotated, in float32 (its own inverse).  On CPU tensors
    the C++ library's fast Walsh-Hadamard transform where it is built (the
    rotation the packed kernel and the page quantizer apply, so every CPU
    path rotates alike; ``O(D log D)`` per row), else the matrix product."""
    fast = cpu_lib.hadamard_rows(x)
    return fast if fast is not None else x.float() @ hadamard(x.shape[-1], x.device)
