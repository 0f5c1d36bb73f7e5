"""Quantization and the page format: how the engine's pages hold tokens.

**Quantizer.** :func:`quantize` / :func:`dequantize`: asymmetric integer
codes (2, 4 or 8 bits) in groups with a scale and a zero point, registered as
the ``kvshrink::quantize`` / ``kvshrink::dequantize`` torch custom ops (with
fake implementations, so they can sit in ``torch.compile`` graphs).  Each op
runs the Triton kernel (:mod:`.triton_quant`) on CUDA tensors and on CPU
tensors while Triton interprets (``TRITON_INTERPRET=1``); otherwise, on the
CPU, the C++ quantizer (:func:`.cpu_lib.quantize`, bf16 parameters) where it
is built, else the PyTorch reference (:mod:`.reference`), which defines the
rounding both kernels match bit for bit.  Importing this module does not import
Triton: that happens at the first launch that goes to it.

**Page format.** vLLM gives each layer a tensor of pages,
``[num_blocks, Hkv, bs, 2D]`` in the model dtype; one (block, KV head)
*region* is ``2 * bs * D`` elements, i.e. ``region_bytes = 2 * bs * D *
elem_bytes`` bytes.  A block in a packed form reinterprets every region of
every layer as bytes and holds up to ``n`` tokens of that form (``n`` =
:attr:`PagedForm.capacity`), laid out as::

    [0, n*kc)                 key codes,   n x kc bytes   (kc = D * k_bits / 8)
    [n*kc, n*(kc+vc))         value codes, n x vc bytes   (vc = D * v_bits / 8)
    [n*(kc+vc), +8n)          n x (k_scale, k_zero, v_scale, v_zero) in bf16

``n`` is the page's capacity, fixed per form, so a page that is not full
keeps the same offsets.  Codes are the quantizer's, per token over the head's
channels; a rotated form stores ``x @ H`` (:mod:`.hadamard`) and attention
reads it in the rotated space (queries rotated, the output rotated back once).

This module is the format's one definition: the worker packs with
:func:`pack`, the packed-attention kernels (:mod:`.cpu_ext`,
:mod:`.triton_packed`) read what it writes, and :func:`unpack` is what their
reference (:mod:`.packed_reference`) reads with.  Which storage forms can be
paged, by name, is :mod:`vllm_kvshrink.storage.paged`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vllm_kvshrink.kernels import cpu_lib
from vllm_kvshrink.kernels import reference as ref
from vllm_kvshrink.kernels._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_positive,
    check_shape,
    check_tensor,
)
from vllm_kvshrink.kernels._launch import use_triton
from vllm_kvshrink.kernels.hadamard import rotate

BITS = (2, 4, 8)


# ==========================================================================
# quantization
# ==========================================================================
class Quantized(NamedTuple):
    """Bit-packed codes and per-group parameters (see :func:`quantize`)."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _check_quant_params(bits, group_size, n_cols, name="x") -> None:
    check_choice("bits", bits, BITS)
    check_positive("group_size", group_size)
    per = 8 // bits
    if group_size % per:
        raise ValueError(
            f"group_size={group_size} must be a multiple of {per} (codes per byte "
            f"at {bits} bits)"
        )
    if n_cols % group_size:
        raise ValueError(
            f"the grouped axis of {name} has {n_cols} elements, not a multiple of "
            f"group_size={group_size}"
        )


def _check_quantize(x, bits, group_size, param_dtype) -> None:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_choice("param_dtype", param_dtype, FLOAT_DTYPES)
    _check_quant_params(bits, group_size, x.shape[2])


def _quant_outputs(x, bits, group_size, param_dtype):
    a, r, c = x.shape
    return Quantized(
        torch.empty(a, r, c * bits // 8, dtype=torch.uint8, device=x.device),
        torch.empty(a, r, c // group_size, dtype=param_dtype, device=x.device),
        torch.empty(a, r, c // group_size, dtype=param_dtype, device=x.device),
    )


@torch.library.custom_op("kvshrink::quantize", mutates_args=())
def _quantize_op(
    x: torch.Tensor, bits: int, group_size: int, param_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quantize(x, bits, group_size, param_dtype)
    if not use_triton(x):
        fast = cpu_lib.quantize(x, bits, group_size, param_dtype)
        return fast if fast is not None else ref.quantize_ref(x, bits, group_size, param_dtype)
    from vllm_kvshrink.kernels import triton_quant  # Triton loads at its first launch

    out = _quant_outputs(x, bits, group_size, param_dtype)
    if x.numel():
        triton_quant.quantize(x, *out, bits, group_size)
    return tuple(out)


@_quantize_op.register_fake
def _(x, bits, group_size, param_dtype):
    _check_quantize(x, bits, group_size, param_dtype)
    return tuple(_quant_outputs(x, bits, group_size, param_dtype))


def _check_dequantize(packed, scale, zero, bits, group_size, dtype) -> None:
    check_tensor("packed", packed, ndim=3, dtypes=(torch.uint8,))
    check_choice("bits", bits, BITS)
    check_choice("dtype", dtype, FLOAT_DTYPES)
    a, r, nbytes = packed.shape
    n_cols = nbytes * 8 // bits
    _check_quant_params(bits, group_size, n_cols, name="packed")
    for name, t in (("scale", scale), ("zero", zero)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, device=packed.device)
        check_shape(name, t, (a, r, n_cols // group_size))
    for name, t in (("packed", packed), ("scale", scale), ("zero", zero)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _dequant_output(packed, bits, dtype, channel):
    a, r, nbytes = packed.shape
    c = nbytes * 8 // bits
    shape = (a, c, r) if channel else (a, r, c)
    return torch.empty(shape, dtype=dtype, device=packed.device)


@torch.library.custom_op("kvshrink::dequantize", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    channel: bool,
) -> torch.Tensor:
    _check_dequantize(packed, scale, zero, bits, group_size, dtype)
    if not use_triton(packed):
        x = ref.dequantize_ref(packed, scale, zero, bits, group_size, dtype)
        return x.transpose(1, 2).contiguous() if channel else x
    from vllm_kvshrink.kernels import triton_quant  # Triton loads at its first launch

    out = _dequant_output(packed, bits, dtype, channel)
    if out.numel():
        view = out.transpose(1, 2) if channel else out  # [A, R, C] as the codes are
        triton_quant.dequantize(packed, scale, zero, view, bits, group_size)
    return out


@_dequantize_op.register_fake
def _(packed, scale, zero, bits, group_size, dtype, channel):
    _check_dequantize(packed, scale, zero, bits, group_size, dtype)
    return _dequant_output(packed, bits, dtype, channel)


AXES = ("token", "channel")


def _as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    check_tensor(name, x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"{name} must be [..., N, D], got shape {tuple(x.shape)}")
    return x.reshape(-1, *x.shape[-2:])


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: str = "token",
    param_dtype: torch.dtype | None = None,
) -> Quantized:
    """Asymmetric ``bits``-bit quantization in groups of ``group_size``, packed.

    ``axis="token"``: each token's ``D`` channels in groups (per-token, how
    KIVI arXiv:2402.02750 stores values); ``axis="channel"``: each channel's
    ``N`` tokens in groups (per-channel, how KIVI stores keys).  Rounding is
    defined by :func:`~.reference.quantize_ref` and the kernel matches it bit
    for bit.

    Args:
        x: ``[..., N, D]`` fp16/bf16/fp32.
        bits: 2, 4 or 8.
        param_dtype: dtype of the stored scale and zero point (default x's).

    Returns:
        :class:`Quantized` with, for ``x`` flattened to ``[A, N, D]``:
        ``axis="token"``: packed ``[A, N, D * bits / 8]``, scale/zero
        ``[A, N, D / group_size]``; ``axis="channel"``: packed
        ``[A, D, N * bits / 8]``, scale/zero ``[A, D, N / group_size]``.
    """
    check_choice("axis", axis, AXES)
    x3 = _as_3d(x, "x")
    if axis == "channel":
        x3 = x3.transpose(1, 2)
    pdt = x.dtype if param_dtype is None else param_dtype
    return Quantized(*torch.ops.kvshrink.quantize(x3, bits, group_size, pdt))


def dequantize(
    q: Quantized,
    bits: int,
    group_size: int,
    axis: str = "token",
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``[A, N, D]`` in ``dtype``
    (``x = q * scale + zero`` in fp32)."""
    check_choice("axis", axis, AXES)
    return torch.ops.kvshrink.dequantize(
        q.packed, q.scale, q.zero, bits, group_size, dtype, axis == "channel")


def roundtrip(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``dequantize(quantize(x, bits, group_size, "token", bfloat16), ...,
    float32)`` for ``x`` ``[A, N, D]``: the values the codes give back, bit
    for bit, in one pass on CPU tensors where the C++ library is built (no
    codes are formed: the tier policy's distortion measure and the research
    path's stored values need only the values), else in the two steps."""
    x3 = _as_3d(x, "x")
    _check_quantize(x3, bits, group_size, torch.bfloat16)
    if not use_triton(x3):
        fast = cpu_lib.roundtrip(x3, bits, group_size)
        if fast is not None:
            return fast.view(x.shape)
    q = quantize(x3, bits, group_size, "token", torch.bfloat16)
    return dequantize(q, bits, group_size, "token", torch.float32).view(x.shape)


# ==========================================================================
# page format
# ==========================================================================
PARAMS = 4  # bf16 values per token: k_scale, k_zero, v_scale, v_zero


@dataclass(frozen=True)
class PagedForm:
    """A token-axis integer form as the engine's pages hold it: ``k_bits`` /
    ``v_bits`` codes per channel of each token, ``rotate`` for a
    Hadamard-rotated form, in regions of ``region_bytes`` bytes (one
    (block, KV head) of pages of ``head_dim``-channel tokens)."""

    name: str
    k_bits: int
    v_bits: int
    rotate: bool
    head_dim: int
    region_bytes: int

    @property
    def key_bytes(self) -> int:
        """Bytes of one token's key codes (``D * k_bits / 8``)."""
        return self.head_dim * self.k_bits // 8

    @property
    def value_bytes(self) -> int:
        """Bytes of one token's value codes (``D * v_bits / 8``)."""
        return self.head_dim * self.v_bits // 8

    @property
    def token_bytes(self) -> int:
        """Bytes of one token of one (layer, KV head): codes and parameters."""
        return self.key_bytes + self.value_bytes + 2 * PARAMS

    @property
    def capacity(self) -> int:
        """Tokens one region (so one block) holds."""
        return self.region_bytes // self.token_bytes

    def offsets(self) -> tuple[int, int, int]:
        """Byte offsets of the key codes, value codes and parameters."""
        n = self.capacity
        return 0, n * self.key_bytes, n * (self.key_bytes + self.value_bytes)

    @property
    def code(self) -> tuple[int, int, int]:
        """``(k_bits, v_bits, rotate)``: what a kernel needs to read it."""
        return self.k_bits, self.v_bits, int(self.rotate)


def _quantize(x: torch.Tensor, bits: int):
    d = x.shape[-1]
    return quantize(x.contiguous(), bits, d, "token", torch.bfloat16)


def pack_tokens(pf: PagedForm, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Each token of ``keys``/``values`` ``[A, N, D]`` (any float dtype, as
    attention sees them: unrotated) as the bytes a page holds for it:
    ``[A, N, token_bytes]`` uint8, key codes, value codes, then its four
    bf16 parameters (where they go in a page: :func:`slot_offsets`)."""
    k = rotate(keys) if pf.rotate else keys.float()
    v = rotate(values) if pf.rotate else values.float()
    qk, qv = _quantize(k, pf.k_bits), _quantize(v, pf.v_bits)
    params = torch.stack([qk.scale[..., 0], qk.zero[..., 0], qv.scale[..., 0],
                          qv.zero[..., 0]], dim=-1)  # [A, N, 4] bf16
    return torch.cat([qk.packed, qv.packed, params.contiguous().view(torch.uint8)], -1)


def slot_offsets(pf: PagedForm, slots: torch.Tensor) -> torch.Tensor:
    """Byte offsets in a region of the tokens at in-page ``slots`` (any
    shape ``S``, each in ``[0, capacity)``): ``[*S, token_bytes]``, in the
    order :func:`pack_tokens` lays a token's bytes out."""
    ko, vo, po = pf.offsets()
    kb, vb = pf.key_bytes, pf.value_bytes
    t = slots[..., None].to(torch.int64)
    return torch.cat([ko + t * kb + torch.arange(kb), vo + t * vb + torch.arange(vb),
                      po + t * (2 * PARAMS) + torch.arange(2 * PARAMS)], -1)


def slot_parts(pf: PagedForm, regions: torch.Tensor) -> list[torch.Tensor]:
    """Views of the key codes, value codes and parameters of every slot of
    ``pf``'s pages in ``regions`` (``[..., region_bytes]`` uint8):
    ``[..., capacity, bytes]`` each, in the order :func:`pack_tokens` lays a
    token's bytes out (:func:`slot_offsets` as views, for whole-row reads and
    writes)."""
    cap = pf.capacity
    return [regions[..., o:o + cap * w].unflatten(-1, (cap, w))
            for o, w in zip(pf.offsets(), (pf.key_bytes, pf.value_bytes, 2 * PARAMS))]


def pack(pf: PagedForm, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pack ``keys``/``values`` ``[A, N, D]`` (any float dtype, as attention
    sees them: unrotated) into ``ceil(N / capacity)`` pages per row:
    ``[A, P, region_bytes]`` uint8, tokens in order, the last page partly
    filled (its unused bytes zero)."""
    a, n, _ = keys.shape
    cap = pf.capacity
    pages = -(-n // cap)
    tokens = pack_tokens(pf, keys, values)  # [A, N, tb]
    out = torch.zeros(a, pages * pf.region_bytes, dtype=torch.uint8)
    j = torch.arange(n)
    at = (j // cap * pf.region_bytes)[:, None] + slot_offsets(pf, j % cap)  # [N, tb]
    out[:, at.reshape(-1)] = tokens.reshape(a, -1)
    return out.view(a, pages, pf.region_bytes)


def unpack(pf: PagedForm, pages: torch.Tensor, n: int, rotated: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` tokens of ``pages`` ``[A, P, region_bytes]``:
    ``(keys, values)`` ``[A, n, D]`` float32, rotated back unless ``rotated``
    (the stored space, what a kernel reads)."""
    a, p, _ = pages.shape
    cap, d = pf.capacity, pf.head_dim
    kc, vc, par = (x.reshape(a, p * cap, -1)[:, :n] for x in slot_parts(pf, pages))
    par = par.contiguous().view(torch.bfloat16)
    k = dequantize(Quantized(kc.contiguous(), par[..., 0:1].contiguous(),
                             par[..., 1:2].contiguous()),
                   pf.k_bits, d, "token", torch.float32)
    v = dequantize(Quantized(vc.contiguous(), par[..., 2:3].contiguous(),
                             par[..., 3:4].contiguous()),
                   pf.v_bits, d, "token", torch.float32)
    if pf.rotate and not rotated:
        k, v = rotate(k), rotate(v)
    return k, v


def region_view(cache: torch.Tensor) -> torch.Tensor:
    """One layer's cache ``[NB, Hkv, bs, 2D]`` as bytes ``[NB, Hkv, region_bytes]``."""
    nb, h = cache.shape[:2]
    return cache.view(torch.uint8).view(nb, h, -1)
