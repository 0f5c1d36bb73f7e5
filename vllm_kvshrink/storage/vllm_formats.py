"""vLLM 0.32's own uniform KV-cache formats, emulated as storage forms.

These are the evaluation's baselines: what a user gets from vLLM alone with
``--kv-cache-dtype <name>``.  Each form replicates, in plain PyTorch, what
vLLM 0.32 stores for one cached token of one (layer, KV head) and what its
attention kernel then reads back, so the research path attends over the same
K/V the engine would.  Form names are vLLM's ``cache_dtype`` strings; every
form has ``kind = "vllm"``.  Paths below are relative to the installed
``vllm`` package (0.32.0); nothing here imports vLLM.

Each form has, besides :class:`~vllm_kvshrink.storage.base.StorageForm`'s
``nbytes`` / ``roundtrip``:

* ``store(keys, values)`` -- the cached fields (codes, scales, ...), unpacked,
  as the store kernel computes them;
* ``load(stored, dtype)`` -- the K/V the attention kernel reconstructs from
  them, in original (unrotated) coordinates;
* ``pack(stored)`` -- the exact bytes of each (token, head) cell, in vLLM's
  layout; ``pack(...).shape[-1]`` is the per-token-per-head size behind
  ``nbytes``.

What is replicated, from where
------------------------------
``fp8`` -- the CPU backend (``v1/attention/backends/cpu_attn.py`` ->
``torch.ops._C.cpu_attn_reshape_and_cache``, C++ ``csrc/cpu/cpu_attn_fp8.hpp``
``float_to_fp8e4m3_scalar`` / ``fp8e4m3_to_float_scalar``).  ``"fp8"`` maps to
E4M3 (``parse_fp8_kv_dtype`` in ``csrc/cpu/cpu_attn.cpp``) with one
per-tensor scale per K and V, ``layer._k_scale_float``, which is 1.0 unless
the checkpoint ships k/v scales (``model_executor/layers/quantization/
kv_cache.py``).  The project's assumption (e4m3, scale 1.0) holds, **but the
rounding is not round-to-nearest**: the CPU kernel clamps to +-448, multiplies
by 2^-120 and keeps fp32 bits 26..20, i.e. it *truncates the mantissa toward
zero* (errors up to one e4m3 step, biased toward 0; about 45 % of bf16 inputs
get a different code than ``x.to(torch.float8_e4m3fn)``, which rounds to
nearest like vLLM's GPU writers).  NaN becomes +448, -0.0 becomes +0.  Reading
back is exact (e4m3 -> fp32, times the scale).

``int8_per_token_head`` -- ``v1/attention/ops/triton_reshape_and_cache_flash.py``
``_reshape_cache_per_token_head`` (QUANT_MAX 127, QUANT_MIN -128, IS_INT_QUANT):
per (token, head) and separately for K and V, ``scale = max(absmax / 127,
1e-6)`` in fp32, ``code = trunc(clamp(x * (1/scale) +- 0.5, -128, 127))``
(round half away from zero).  No rotation.  Read (``triton_unified_attention.py``,
``USE_PER_TOKEN_HEAD_SCALES``): ``code * scale`` (the kernel folds the scale
into the scores and into P).

``int4_per_token_head`` -- ``v1/attention/ops/int4_per_token_head.py``
``reshape_and_cache_int4`` + ``_reshape_cache_int4_kernel``: **both K and V**
are first rotated by ``single_rht`` (``x * signs`` then the *unnormalised*
Walsh-Hadamard butterfly, norm ``sqrt(b)``, ``b`` = the largest power-of-two
divisor of ``D``, applied block-diagonally when ``b < D``; one sign vector
shared by K, V, Q, all layers and heads: ``torch.bernoulli(full(b, 0.5),
generator=Generator().manual_seed(0x9E3779B9)) * 2 - 1``) and the rotated
values are **cast back to the model dtype** before quantization.  Then per
(token, head): asymmetric, ``scale = max((max - min) / 15, 1e-6)``, ``zp =
clamp(round_half_away(-min / scale), 0, 15)``, ``code = clamp(round_half_away(
x * (1/scale) + zp), 0, 15)``; two codes per byte (even index in the low
nibble); the zero point is hidden in the low 4 mantissa bits of the fp32
scale.  Read (``_attn_packed``): scale = packed bits with the low 4 bits
cleared (so the read scale differs from the one used to quantize by < 2e-6
relative), ``(code - zp) * scale``; Q is rotated the same way and the output
inverse-rotated and divided by ``b`` -- equivalent to reading
``signs * butterfly((code - zp) * scale) / b`` as K and V, which is what
:meth:`Int4PerTokenHead.load` returns.  Because the zero point is clamped to
[0, 15], a token-head whose *rotated* vector does not straddle 0 is clipped:
a vector dominated by channel 0 (rotated into a constant) is reconstructed as
almost 0 (see the tests).

``turboquant_*`` -- presets of ``model_executor/layers/quantization/
turboquant/config.py`` (``TQ_PRESETS``), store ``v1/attention/ops/
triton_turboquant_store.py`` (``triton_turboquant_store``, the default AoS
layout; the SoA store is only used with FlyDSL on AMD gfx950), read
``v1/attention/ops/triton_turboquant_decode.py`` (``_tq_decode_stage1``,
``_tq_full_dequant_kv``), rotation and codebook set up in
``v1/attention/backends/turboquant_attn.py`` ``_ensure_on_device``.
Keys, MSE presets (``4bit_nc``, ``k3v4_nc``, ``3bit_nc``): ``norm = ||k||``
(fp32, stored fp16), ``y = (k / (norm + 1e-8)) @ H`` with ``H`` the
*orthonormal* Sylvester Hadamard matrix (no random signs -- the backend
explains signs do not help a symmetric codebook), ``idx = #{midpoints <= y}``
over the Lloyd-Max codebook for N(0, 1/D) (``turboquant/centroids.py``,
re-derived here by :func:`lloyd_max_centroids` with the same arithmetic);
read: ``c = centroids[idx]``, with norm correction ``c / sqrt(sum c^2 +
1e-16)``, times the fp16 norm, rotated back (``@ H``; the decode kernel
rotates Q instead).  Without random signs a key's mean lands on rotated
coordinate 0, a spike the Gaussian codebook cannot hold: a constant key loses
about 35 % of its direction at 4 bits (random keys about 10 %).  Keys, ``k8v4``: a plain cast to FP8 E4M3 *without any
scale* (on Hopper+ ``cvt.rn.satfinite``: round to nearest even, saturating at
+-448; Ampere/Ada use e4b15, not replicated).  Values, every preset: per
(token, head) ``scale = (max - min) / (2^bits - 1)`` (floored at 1e-8),
``code = clamp(floor((v - min) / scale + 0.5), 0, 2^bits - 1)``; scale and
``min`` are stored as **fp16** and the read uses the fp16-rounded ones
(``code * scale16 + min16``), so the value error includes fp16 rounding of
``min`` -- large when ``|min|`` dwarfs the range.  vLLM also keeps the first
and last two attention layers of a dense model in the model dtype under any
turboquant preset (``TurboQuantConfig.get_boundary_skip_layers``, applied in
``engine/arg_utils.py``); a per-(layer, head) form cannot express that, see
:meth:`TurboQuant.skip_layers`.  Also note the first prefill chunk attends
over the unquantized K/V; only later reads see the stored form.

How it was checked (``tests/kernels/test_storage_vllm_formats.py``)
---------------------------------------------------------
* ``fp8``: codes bit-for-bit against the installed C++ op
  ``cpu_attn_reshape_and_cache`` (run in-process, ISA ``vec``), and
  ``cpu_attention_with_kv_cache`` output against attention over
  :meth:`FP8CPU.roundtrip` (needs AVX-512, skipped otherwise).
* Triton formats: vLLM's own store kernels run under ``TRITON_INTERPRET=1`` on
  CPU tensors in a subprocess (vLLM disables Triton when the package has no
  CPU backend; the subprocess registers a stand-in so the interpreter runs).
  The cache bytes -- the real page layout for the per-token-head modes, with
  the inline fp32 scales -- equal :meth:`pack` bit for bit; TurboQuant's
  ``_tq_full_dequant_kv`` output (fp16, keys still rotated) equals
  ``load_rotated_keys`` / ``load_values`` bit for bit; the attention kernels'
  outputs (``unified_attention`` for int8/int4,
  ``triton_turboquant_decode_attention``) match attention over the K/V
  :meth:`load` returns in fp32 to fp32 accuracy (1e-6 relative).
* Pure-torch helpers bit for bit: ``single_rht`` (signs and transform),
  ``_build_hadamard``, ``get_centroids``; ``nbytes`` against vLLM's page-size
  arithmetic (``AttentionSpec.page_size_bytes`` after the backend's
  ``customize_spec``).

Not checked against vLLM's code: ``k8v4``'s key rounding -- the interpreter's
fp32 -> fp8 conversion is not the hardware's (it rounds ties up and mishandles
mantissa carries and overflow), so it is fed E4M3-representable keys and the
rounding follows Triton's NVIDIA lowering (``cvt.rn.satfinite.e4m3x2.f32``)
instead; bf16 *queries* in the attention kernels (the interpreter's int8 ->
bf16 cast is broken; fp32 queries are used); anything GPU-specific.

What can differ on a GPU: Triton's fp32 ``/`` lowers to the approximate
``div.full.f32`` (2 ulp) and its compiler may contract ``a * b + c`` into an
FMA, while this module (and the interpreter) round every operation IEEE-exactly;
on CUDA ``single_rht`` uses the hadacore / Triton-MMA Hadamard rather than the
CPU butterfly.  Either can move a value across a rounding boundary: rare +-1
code differences, never a different format.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache
from typing import ClassVar

import torch

from vllm_kvshrink.storage.base import StorageForm

#: largest finite E4M3 (``float8_e4m3fn``) value
_E4M3_MAX = 448.0


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """``x + 0.5`` or ``x - 0.5`` by sign, then truncated toward zero: the
    kernels' ``tl.where(x >= 0, x + 0.5, x - 0.5)`` followed by a float->int
    conversion.  Stays a float tensor (no int32 overflow for huge inputs)."""
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def _le_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[...]`` fp32/fp16 -> ``[..., itemsize]`` uint8, little-endian (the
    byte order the kernels write scales in)."""
    assert sys.byteorder == "little", "pack() assumes a little-endian host"
    return x.contiguous()[..., None].view(torch.uint8)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` values in [0, 15] -> ``[..., D/2]`` uint8, element ``2i``
    in the low nibble of byte ``i`` (``pack_int4_nibbles``)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def _pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` values in [0, 7] -> ``[..., 3D/8]`` uint8: each group of 8
    codes is a 24-bit little-endian word, code ``j`` at bits ``3j`` (the
    TurboQuant store's 3-bit packing)."""
    c = codes.to(torch.int32).unflatten(-1, (-1, 8))
    word = (c << (3 * torch.arange(8, device=c.device, dtype=torch.int32))).sum(-1)
    b = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], -1)
    return b.flatten(-2).to(torch.uint8)


def _check(keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.shape != values.shape or keys.dim() != 3:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} "
                         "must both be [A, N, D]")
    if not keys.is_floating_point() or keys.dtype != values.dtype:
        raise ValueError(f"keys/values must share one float dtype, got {keys.dtype}/{values.dtype}")


class _VllmForm(StorageForm):
    """A vLLM format: every token pays the same bytes (no groups)."""

    kind: ClassVar[str] = "vllm"

    def token_head_bytes(self, head_dim: int) -> int:
        """Bytes of one token of one (layer, KV head), K + V: vLLM's page
        content per (head, slot)."""
        raise NotImplementedError

    def nbytes(self, n_tokens: int, head_dim: int) -> int:
        return n_tokens * self.token_head_bytes(head_dim)

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load(self, stored: dict[str, torch.Tensor], dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pack(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def roundtrip(self, keys: torch.Tensor, values: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(keys, values)
        return self.load(self.store(keys, values), keys.dtype)


# --------------------------------------------------------------------------
# fp8 (CPU backend)
# --------------------------------------------------------------------------
def fp8_e4m3_cpu_encode(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """vLLM CPU's float -> E4M3 byte (``float_to_fp8e4m3_scalar``).

    ``x * (1/scale)`` (fp32), clamped to +-448 (NaN -> +448, as
    ``std::min(448, NaN)`` returns 448), then multiplied by 2^-120 so that fp32
    bits 26..20 are the E4M3 exponent and mantissa, *truncated*; a payload of
    0 keeps the sign (-tiny -> 0x80) but an exact zero gives 0x00.

    Args:
        x: ``[...]`` float.  Returns ``[...]`` uint8 codes.
    """
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    v = x.float() * inv.to(x.device)
    v = torch.where(v.isnan(), torch.full_like(v, _E4M3_MAX), v.clamp(-_E4M3_MAX, _E4M3_MAX))
    bits = (v * 2.0 ** -120).view(torch.int32)
    sign = (bits >> 24) & 0x80
    payload = ((bits >> 20) & 0x7F).clamp_max(0x7E)  # 0x7F is E4M3's NaN
    code = torch.where(v == 0, torch.zeros_like(bits), sign | payload)
    return code.to(torch.uint8)


def fp8_e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes ``[...]`` uint8 -> their exact fp32 values."""
    return codes.view(torch.float8_e4m3fn).float()


class FP8CPU(_VllmForm):
    """``kv_cache_dtype="fp8"`` on vLLM's CPU backend: E4M3, one per-tensor
    scale per K and V (1.0 unless the checkpoint has k/v scales), mantissa
    truncated toward zero."""

    name = "fp8"
    doc = "vLLM CPU fp8: E4M3 per element, per-tensor scale 1.0, mantissa truncated"
    bits = 8
    paper = "vLLM 0.32 kv_cache_dtype='fp8' (CPU backend, csrc/cpu/cpu_attn_fp8.hpp)"

    def __init__(self, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        self.k_scale = float(k_scale)
        self.v_scale = float(v_scale)

    def token_head_bytes(self, head_dim: int) -> int:
        return 2 * head_dim  # K and V, one byte per element, no per-token scale

    def store(self, keys, values):
        """``{"k": [..., D] uint8, "v": [..., D] uint8}`` E4M3 codes."""
        return {"k": fp8_e4m3_cpu_encode(keys, self.k_scale),
                "v": fp8_e4m3_cpu_encode(values, self.v_scale)}

    def load(self, stored, dtype):
        return ((fp8_e4m3_decode(stored["k"]) * self.k_scale).to(dtype),
                (fp8_e4m3_decode(stored["v"]) * self.v_scale).to(dtype))

    def pack(self, stored):
        """``[..., 2D]``: K codes then V codes (the CPU kernel lays K out
        column-major inside a block, but a token still owns ``2D`` bytes)."""
        return torch.cat([stored["k"], stored["v"]], -1)


# --------------------------------------------------------------------------
# int8_per_token_head
# --------------------------------------------------------------------------
class Int8PerTokenHead(_VllmForm):
    """``kv_cache_dtype="int8_per_token_head"``: symmetric int8 with one fp32
    absmax scale per (token, head), K and V separately, no rotation."""

    name = "int8_per_token_head"
    doc = "vLLM int8 per token-head: symmetric absmax/127, fp32 scale inline"
    bits = 8
    paper = "vLLM 0.32 kv_cache_dtype='int8_per_token_head' (triton_reshape_and_cache_flash.py)"

    def token_head_bytes(self, head_dim: int) -> int:
        # TritonAttentionBackend.customize_spec: (D_k + D_v) int8 + 2 fp32 scales
        return 2 * (head_dim + 4)

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., D]`` -> (codes ``[..., D]`` int8, scale ``[...]`` fp32)."""
        xf = x.float()
        scale = torch.clamp_min(xf.abs().amax(-1) / 127.0, 1e-6)
        q = xf * (1.0 / scale)[..., None]
        # round half away from zero, clamp, then the int8 store truncates
        q = torch.where(q >= 0, q + 0.5, q - 0.5).clamp(-128.0, 127.0).trunc()
        return q.to(torch.int8), scale

    def store(self, keys, values):
        """``{"k", "v": [..., D] int8; "k_scale", "v_scale": [...] fp32}``."""
        kq, ks = self._quantize(keys)
        vq, vs = self._quantize(values)
        return {"k": kq, "k_scale": ks, "v": vq, "v_scale": vs}

    def load(self, stored, dtype):
        return ((stored["k"].float() * stored["k_scale"][..., None]).to(dtype),
                (stored["v"].float() * stored["v_scale"][..., None]).to(dtype))

    def pack(self, stored):
        """``[..., 2D + 8]``: ``[K codes | K scale | V codes | V scale]`` (the
        inline layout of ``TritonAttentionImpl._ensure_scale_caches``)."""
        return torch.cat([stored["k"].view(torch.uint8), _le_bytes(stored["k_scale"]),
                          stored["v"].view(torch.uint8), _le_bytes(stored["v_scale"])], -1)


# --------------------------------------------------------------------------
# int4_per_token_head
# --------------------------------------------------------------------------
def _largest_pow2_divisor(n: int) -> int:
    return n & -n


@lru_cache(maxsize=None)
def _rht_signs_cpu(b: int) -> torch.Tensor:
    # The one sign vector vLLM draws (round 0 of _get_rht_signs): a seeded
    # CPU generator, so it is the same on every device and run.
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0x9E3779B9)
    return 2.0 * torch.bernoulli(torch.full((b,), 0.5), generator=gen) - 1.0


def rht_signs(b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[b]`` fp32 +-1: the sign vector of vLLM's INT4 randomized Hadamard
    transform for blocks of size ``b``."""
    return _rht_signs_cpu(b).to(device)


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dim (a power of
    two), as vLLM's CPU path computes it: stages of width 1, 2, 4, ... each
    replacing pairs ``(a, b)`` by ``(a + b, a - b)`` -- the same additions in
    the same order, so fp32 results are bit-identical."""
    d = x.shape[-1]
    h = 1
    while h < d:
        pairs = x.unflatten(-1, (d // (2 * h), 2, h))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).flatten(-3)
        h *= 2
    return x


def rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """vLLM's ``single_rht``: ``H(signs * x)`` (or ``signs * H(x)`` for the
    inverse) per block of ``b`` = largest power-of-two divisor of ``D``.  Not
    normalised: ``rht(rht(x), inverse=True) == b * x``.

    Args:
        x: ``[..., D]`` float (fp32 for bit-exactness with vLLM).
    """
    d = x.shape[-1]
    b = _largest_pow2_divisor(d)
    blocks = x.unflatten(-1, (d // b, b))
    s = rht_signs(b, x.device)
    out = _butterfly(blocks) * s if inverse else _butterfly(blocks * s)
    return out.flatten(-2)


class Int4PerTokenHead(_VllmForm):
    """``kv_cache_dtype="int4_per_token_head"``: K and V rotated by the RHT,
    then asymmetric 4-bit per (token, head), zero point inside the fp32
    scale."""

    name = "int4_per_token_head"
    doc = "vLLM int4 per token-head: RHT on K and V, asymmetric 4-bit, zp in the fp32 scale"
    bits = 4
    paper = "vLLM 0.32 kv_cache_dtype='int4_per_token_head' (v1/attention/ops/int4_per_token_head.py)"

    def token_head_bytes(self, head_dim: int) -> int:
        if head_dim % 2:
            raise ValueError(f"int4_per_token_head needs an even head_dim, got {head_dim}")
        # customize_spec: (D/2 + D/2) packed bytes + 2 fp32 scales
        return 2 * (head_dim // 2 + 4)

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., D]`` model-dtype -> (codes ``[..., D]`` uint8 in [0, 15],
        packed scale ``[...]`` fp32 whose low 4 mantissa bits are the zp)."""
        # reshape_and_cache_int4 rotates in fp32 and casts back to the model
        # dtype; the kernel loads that as fp32
        xr = rht(x.float()).to(x.dtype).float()
        lo, hi = xr.amin(-1), xr.amax(-1)
        scale = torch.clamp_min((hi - lo) / 15.0, 1e-6)
        zp = _round_half_away(-lo / scale).clamp(0.0, 15.0)
        s = xr * (1.0 / scale)[..., None] + zp[..., None]
        codes = _round_half_away(s).clamp(0.0, 15.0).to(torch.uint8)
        bits = (scale.view(torch.int32) & -16) | zp.to(torch.int32)
        return codes, bits.view(torch.float32)

    @staticmethod
    def _dequantize(codes: torch.Tensor, packed_scale: torch.Tensor) -> torch.Tensor:
        """Rotated-space values the attention kernel uses, ``[..., D]`` fp32."""
        bits = packed_scale.view(torch.int32)
        zp = (bits & 0xF).float()
        scale = (bits & -16).view(torch.float32)  # the read drops the zp bits
        return (codes.float() - zp[..., None]) * scale[..., None]

    def store(self, keys, values):
        """``{"k", "v": [..., D] uint8 codes; "k_scale", "v_scale": [...] fp32
        packed scales}``."""
        kq, ks = self._quantize(keys)
        vq, vs = self._quantize(values)
        return {"k": kq, "k_scale": ks, "v": vq, "v_scale": vs}

    def load(self, stored, dtype):
        d = stored["k"].shape[-1]
        b = float(_largest_pow2_divisor(d))

        def back(codes, scale):
            # attention rotates Q the same way and inverse-rotates the output,
            # both normalised by b: reading rht^-1(x~) / b as K and V is the same
            return (rht(self._dequantize(codes, scale), inverse=True) / b).to(dtype)

        return back(stored["k"], stored["k_scale"]), back(stored["v"], stored["v_scale"])

    def pack(self, stored):
        """``[..., D + 8]``: ``[K nibbles | K scale | V nibbles | V scale]``."""
        return torch.cat([_pack_nibbles(stored["k"]), _le_bytes(stored["k_scale"]),
                          _pack_nibbles(stored["v"]), _le_bytes(stored["v_scale"])], -1)


# --------------------------------------------------------------------------
# TurboQuant
# --------------------------------------------------------------------------
#: preset -> (key bits: 8 = FP8 keys, else Lloyd-Max MSE bits; value bits;
#: norm correction), as model_executor/layers/quantization/turboquant/config.py
TQ_PRESETS: dict[str, tuple[int, int, bool]] = {
    "turboquant_k8v4": (8, 4, False),
    "turboquant_4bit_nc": (4, 4, True),
    "turboquant_k3v4_nc": (3, 4, True),
    "turboquant_3bit_nc": (3, 3, True),
}


@lru_cache(maxsize=None)
def lloyd_max_centroids(d: int, bits: int) -> torch.Tensor:
    """``[2^bits]`` fp32 Lloyd-Max centroids for N(0, 1/d), TurboQuant's
    codebook (``turboquant/centroids.py``).

    Same recipe and the same float64 operations in the same order (trapezoid
    rule with 200 panels on [-10.5 sigma, 10.5 sigma] outer edges, starting
    from 2^bits evenly spaced points in [-3.5 sigma, 3.5 sigma], at most 200
    iterations, stopping when no centroid moves by 1e-10 -- and then keeping
    the previous iterate, as vLLM does), so the fp32 codebook is identical.
    """
    levels = 2 ** bits
    var = 1.0 / d
    sigma = math.sqrt(var)

    def density(x: float) -> float:
        return (1.0 / math.sqrt(2 * math.pi * var)) * math.exp(-x * x / (2 * var))

    def integral(f, a: float, b: float, panels: int = 200) -> float:
        step = (b - a) / panels
        total = 0.5 * (f(a) + f(b))
        for i in range(1, panels):
            total += f(a + i * step)
        return total * step

    lo, hi = -3.5 * sigma, 3.5 * sigma
    cents = [lo + (hi - lo) * (i + 0.5) / levels for i in range(levels)]
    for _ in range(200):
        cuts = [(cents[i] + cents[i + 1]) / 2.0 for i in range(levels - 1)]
        edges = [lo * 3] + cuts + [hi * 3]
        moved = []
        for i in range(levels):
            a, b = edges[i], edges[i + 1]
            mass = integral(density, a, b)
            first = integral(lambda x: x * density(x), a, b)
            moved.append(first / mass if mass > 1e-15 else cents[i])
        if max(abs(moved[i] - cents[i]) for i in range(levels)) < 1e-10:
            break
        cents = moved
    return torch.tensor(cents, dtype=torch.float32)


@lru_cache(maxsize=None)
def _hadamard_cpu(d: int) -> torch.Tensor:
    h = torch.tensor([[1.0]])
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def orthonormal_hadamard(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[d, d]`` fp32 Sylvester Hadamard / sqrt(d), symmetric and orthonormal:
    TurboQuant's rotation (``_build_hadamard``; built on the CPU, then moved)."""
    if d & (d - 1):
        raise ValueError(f"TurboQuant's Hadamard rotation needs a power-of-two head_dim, got {d}")
    return _hadamard_cpu(d).to(device)


def fp8_e4m3_satfinite(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E4M3 bytes as Triton's ``.to(tl.float8e4nv)`` on sm_89+
    (``cvt.rn.satfinite``): round to nearest even, saturate to +-448."""
    return x.float().clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


class TurboQuant(_VllmForm):
    """A TurboQuant preset: Hadamard-rotated Lloyd-Max keys with an fp16 norm
    (or FP8 keys for ``k8v4``) and uniform asymmetric values with fp16 scale
    and zero, K + V packed in one slot per (token, head)."""

    doc = "vLLM TurboQuant"
    paper = ("TurboQuant (Zandieh et al., ICLR 2026) as vLLM 0.32 implements it "
             "(v1/attention/ops/triton_turboquant_store.py)")

    def __init__(self, preset: str) -> None:
        if preset not in TQ_PRESETS:
            raise ValueError(f"unknown TurboQuant preset {preset!r}; allowed: {', '.join(TQ_PRESETS)}")
        self.name = preset
        self.key_bits, self.value_bits, self.norm_correction = TQ_PRESETS[preset]
        self.key_fp8 = self.key_bits == 8
        keys = "FP8 keys (no scale)" if self.key_fp8 else (
            f"{self.key_bits}-bit Hadamard+Lloyd-Max keys, fp16 norm"
            + (", norm-corrected" if self.norm_correction else ""))
        self.doc = f"vLLM TurboQuant: {keys}; {self.value_bits}-bit values, fp16 scale/zero"
        # bits of a K/V element, averaged over K and V
        self.bits = (self.key_bits + self.value_bits) // 2

    # ---- layout (TurboQuantConfig) ------------------------------------
    def key_bytes(self, d: int) -> int:
        return d if self.key_fp8 else math.ceil(d * self.key_bits / 8) + 2  # + fp16 norm

    def value_bytes(self, d: int) -> int:
        return math.ceil(d * self.value_bits / 8) + 4  # + fp16 scale, fp16 zero

    def token_head_bytes(self, head_dim: int) -> int:
        slot = self.key_bytes(head_dim) + self.value_bytes(head_dim)
        return slot + slot % 2  # slot_size_aligned: rounded up to even

    @staticmethod
    def skip_layers(num_layers: int, n: int = 2) -> list[int]:
        """Attention layers vLLM keeps in the model dtype under any turboquant
        preset for a dense (non-hybrid) model: the first and last ``n``
        (``TurboQuantConfig.get_boundary_skip_layers``; none for hybrids)."""
        n = min(n, num_layers // 2)
        if n <= 0:
            return []
        return sorted(set(range(n)) | set(range(num_layers - n, num_layers)))

    def codebook(self, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(centroids ``[2^b]``, midpoints ``[2^b - 1]``) fp32 for the keys.
        ``k8v4`` has none (its codebook only serves other kernel paths)."""
        c = lloyd_max_centroids(d, self.key_bits).to(device)
        c_sorted = c.sort().values
        return c, (c_sorted[:-1] + c_sorted[1:]) / 2

    # ---- store ------------------------------------------------------------
    def _store_values(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., D]`` -> codes ``[..., D]`` uint8, scale/zero ``[...]`` fp16."""
        vf = v.float()
        lo, hi = vf.amin(-1), vf.amax(-1)
        scale = (hi - lo) / float(2 ** self.value_bits - 1)
        scale = torch.where(scale > 1e-8, scale, torch.full_like(scale, 1e-8))
        # int32 conversion of a value >= 0.5 truncates: floor(x + 0.5)
        q = ((vf - lo[..., None]) / scale[..., None] + 0.5).trunc()
        q = q.clamp(0.0, float(2 ** self.value_bits - 1))
        return {"v": q.to(torch.uint8), "v_scale": scale.half(), "v_zero": lo.half()}

    def store(self, keys, values):
        """Keys: ``{"k": [..., D] uint8}`` FP8 codes (``k8v4``) or ``{"k":
        [..., D] uint8 codebook indices, "k_norm": [...] fp16}``; values: ``{"v":
        [..., D] uint8, "v_scale", "v_zero": [...] fp16}``."""
        d = keys.shape[-1]
        out = self._store_values(values)
        if self.key_fp8:
            out["k"] = fp8_e4m3_satfinite(keys)
            return out
        kf = keys.float()
        # norm, normalise, rotate: the launcher's torch ops on [N*H, D]
        flat = kf.reshape(-1, d)
        norms = flat.norm(dim=1, keepdim=True)
        y = (flat / (norms + 1e-8)) @ orthonormal_hadamard(d, keys.device)
        _, mids = self.codebook(d, keys.device)
        # the kernel's binary search for "y >= midpoint" counts midpoints <= y
        idx = torch.searchsorted(mids, y.contiguous(), right=True)
        out["k"] = idx.to(torch.uint8).reshape(kf.shape)
        out["k_norm"] = norms.reshape(kf.shape[:-1]).half()
        return out

    # ---- load -------------------------------------------------------------
    def load_rotated_keys(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """MSE keys as the kernels reconstruct them, still rotated:
        ``norm16 * c`` (``c`` norm-corrected if the preset says so), ``[..., D]``
        fp32."""
        d = stored["k"].shape[-1]
        cents, _ = self.codebook(d, stored["k"].device)
        c = cents[stored["k"].long()]
        if self.norm_correction:
            c = c * (1.0 / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16))
        return stored["k_norm"].float()[..., None] * c

    def load_values(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """``code * scale16 + zero16`` in fp32, ``[..., D]``."""
        return (stored["v"].float() * stored["v_scale"].float()[..., None]
                + stored["v_zero"].float()[..., None])

    def load(self, stored, dtype):
        v = self.load_values(stored).to(dtype)
        if self.key_fp8:
            return fp8_e4m3_decode(stored["k"]).to(dtype), v
        d = stored["k"].shape[-1]
        k_rot = self.load_rotated_keys(stored)
        # the decode kernel scores q @ H against the rotated key; H is
        # symmetric and orthonormal, so the key it reads is k_rot @ H
        k = (k_rot.reshape(-1, d) @ orthonormal_hadamard(d, k_rot.device)).reshape(k_rot.shape)
        return k.to(dtype), v

    # ---- bytes ------------------------------------------------------------
    def pack(self, stored):
        """``[..., token_head_bytes(D)]``: ``[key | value | pad]`` with key =
        FP8 bytes or (packed indices, fp16 norm) and value = (packed codes,
        fp16 scale, fp16 zero), little-endian."""
        pack_bits = {4: _pack_nibbles, 3: _pack_3bit}
        parts = []
        if self.key_fp8:
            parts.append(stored["k"])
        else:
            parts += [pack_bits[self.key_bits](stored["k"]), _le_bytes(stored["k_norm"])]
        parts += [pack_bits[self.value_bits](stored["v"]),
                  _le_bytes(stored["v_scale"]), _le_bytes(stored["v_zero"])]
        out = torch.cat(parts, -1)
        pad = self.token_head_bytes(stored["v"].shape[-1]) - out.shape[-1]
        if pad:
            out = torch.cat([out, out.new_zeros(*out.shape[:-1], pad)], -1)
        return out


# --------------------------------------------------------------------------
# registry (imported by vllm_kvshrink.storage)
# --------------------------------------------------------------------------
FORMS: dict[str, StorageForm] = {
    f.name: f for f in (
        FP8CPU(),
        Int8PerTokenHead(),
        Int4PerTokenHead(),
        *(TurboQuant(p) for p in TQ_PRESETS),
    )
}

__all__ = ["FORMS", "FP8CPU", "Int8PerTokenHead", "Int4PerTokenHead", "TurboQuant",
           "TQ_PRESETS", "fp8_e4m3_cpu_encode", "fp8_e4m3_decode", "fp8_e4m3_satfinite",
           "rht", "rht_signs", "lloyd_max_centroids", "orthonormal_hadamard"]
