"""Plain PyTorch twins of the quantizer's kernels.

They define what the kernels compute (tests compare the two) and are what the
quantizer runs on CPU tensors when Triton is not interpreting.  Shapes follow
:mod:`vllm_kvshrink.kernels.quant`.  The reference of packed attention is
:mod:`vllm_kvshrink.kernels.packed_reference`.
"""

from __future__ import annotations

import torch


# --------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------
def quantize_ref(
    x: torch.Tensor, bits: int, group_size: int, param_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group quantization along the last axis, bit-packed.

    Per group ``g`` of ``group_size`` consecutive elements (fp32 arithmetic)::

        qmax  = 2**bits - 1
        zero  = param_dtype(min(g))
        scale = param_dtype((max(g) - min(g)) / qmax), replaced by 1 where it is 0
        q     = clamp(round_half_even((x - zero) / scale), 0, qmax)

    ``zero`` and ``scale`` are rounded to ``param_dtype`` *before* ``q`` is
    computed, so dequantizing with the stored parameters is consistent.
    ``8 // bits`` codes share a byte, element ``j`` of a byte in bits
    ``[j * bits, (j + 1) * bits)`` (little-endian within the byte).

    Args:
        x: ``[A, R, C]`` float, ``C % group_size == 0``.

    Returns:
        ``(packed [A, R, C * bits // 8] uint8, scale [A, R, C // group_size],
        zero [A, R, C // group_size])``, parameters in ``param_dtype``.
    """
    a, r, c = x.shape
    qmax = 2**bits - 1
    g = x.float().reshape(a, r, c // group_size, group_size)
    mn = g.amin(-1)
    mx = g.amax(-1)
    zero = mn.to(param_dtype)
    scale = ((mx - mn) / qmax).to(param_dtype)
    scale = torch.where(scale > 0, scale, torch.ones((), dtype=param_dtype, device=x.device))
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None])
    q = q.clamp(0, qmax).to(torch.int32).reshape(a, r, c)
    per = 8 // bits
    shifts = torch.arange(per, device=x.device, dtype=torch.int32) * bits
    packed = (q.reshape(a, r, c // per, per) << shifts).sum(-1).to(torch.uint8)
    return packed, scale, zero


def unpack_ref(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``[..., C]`` (int32) of ``packed [..., C * bits // 8]``."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    q = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return q.flatten(-2)


def dequantize_ref(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x = q * scale + zero`` in fp32, cast to ``dtype``: ``[A, R, C]``."""
    q = unpack_ref(packed, bits).float()
    a, r, c = q.shape
    g = q.view(a, r, c // group_size, group_size)
    x = g * scale.float()[..., None] + zero.float()[..., None]
    return x.reshape(a, r, c).to(dtype)
