"""Triton launches of the quantizer (:mod:`.quant` checks the arguments and
allocates the outputs; this module picks block sizes and grids and launches
:func:`~.triton_kernels.quantize_kernel` / :func:`~.triton_kernels.
dequantize_kernel`)."""

from __future__ import annotations

import torch
import triton

from vllm_kvshrink.kernels import triton_kernels as tk
from vllm_kvshrink.kernels._launch import launchable


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _meta(rows: int, bits: int, group_size: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_B)``: rows per program and bytes per group's row."""
    per = 8 // bits
    block_b = _pow2(group_size // per)
    block_r = max(1, min(_pow2(rows), 4096 // (block_b * per)))
    return block_r, block_b


def quantize(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             bits: int, group_size: int) -> None:
    """Quantize ``x [A, R, C]`` in groups of ``group_size`` along ``C`` into
    ``packed [A, R, C * bits / 8]`` uint8 and ``scale`` / ``zero``
    ``[A, R, C / group_size]`` (bf16 or ``x``'s dtype), all checked and
    allocated by the caller; ``x`` non-empty."""
    a, r, c = x.shape
    block_r, block_b = _meta(a * r, bits, group_size)
    launchable(tk.quantize_kernel)[(triton.cdiv(a * r, block_r) * (c // group_size),)](
        x, packed, scale, zero, a * r, r, *x.stride(),
        BITS=bits, GROUP_SIZE=group_size, N_GROUPS=c // group_size,
        BLOCK_R=block_r, BLOCK_B=block_b, PARAM_BF16=scale.dtype == torch.bfloat16)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               out: torch.Tensor, bits: int, group_size: int) -> None:
    """Write ``q * scale + zero`` of ``packed [A, R, C * bits / 8]`` and
    ``scale`` / ``zero [A, R, C / group_size]`` into ``out``, a (possibly
    transposed) ``[A, R, C]`` view, non-empty."""
    a, r, c = out.shape
    block_r, block_b = _meta(a * r, bits, group_size)
    launchable(tk.dequantize_kernel)[(triton.cdiv(a * r, block_r) * (c // group_size),)](
        packed, scale, zero, out, a * r, r, *out.stride(),
        BITS=bits, GROUP_SIZE=group_size, N_GROUPS=c // group_size,
        BLOCK_R=block_r, BLOCK_B=block_b,
        enable_fp_fusion=False)  # q * scale + zero unfused: the reference's bits
