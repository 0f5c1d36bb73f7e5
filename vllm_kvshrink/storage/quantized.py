"""``int8`` / ``int4`` / ``int2``: asymmetric integer codes with a scale and
a zero point, the quantizer of :mod:`vllm_kvshrink.kernels.quant` (reference,
Triton and CUDA agree bit for bit; on CPU tensors the reference runs).

* keys per channel over groups of ``key_group`` tokens (KIVI, Liu et al.
  2024, arXiv:2402.02750: key outliers live in a few channels), or
  ``key_axis="token"``: per token over the head's ``D`` channels;
* values per token over the head's ``D`` channels (KIVI), with as many bits
  as the keys or fewer (``k4v2``: values tolerate coarser codes, they are
  averaged, not exponentiated; cf. KIVI's and KVQuant's asymmetric choices);
* ``rotate``: keys and values rotated per head by an orthonormal Hadamard
  matrix first (:mod:`vllm_kvshrink.kernels.hadamard`), rotated back when read;
* scales and zero points stored in bf16 (2 bytes each).

Exact bytes of ``n`` tokens of one (layer, KV head)::

    keys, per channel: D * ceil(n / G) * (G * bits / 8 + 4)   (every started
                       group of G tokens pays for G codes and its parameters)
    keys, per token:   n * (D * bits / 8 + 4)
    values:            n * (D * value_bits / 8 + 4)

e.g. ``D = 64``, ``G = 32``, int4: 40 + 36 = 76 bytes per token and head
against 256 in bf16 (0.297).  A group that is not full is padded with copies
of its last token, which leaves its min and max, and so its codes, unchanged.
"""

from __future__ import annotations

import torch

from vllm_kvshrink.kernels import quant
from vllm_kvshrink.kernels.hadamard import rotate
from vllm_kvshrink.storage.base import StorageForm

PARAM_BYTES = 2  # scale and zero point in bf16


class IntForm(StorageForm):
    def __init__(self, bits: int, key_axis: str = "channel", rotate: bool = False,
                 key_group: int = 32, value_bits: int | None = None) -> None:
        value_bits = bits if value_bits is None else value_bits
        for b in (bits, value_bits):
            if b not in (2, 4, 8):
                raise ValueError(f"bits={b} is not supported; allowed: 2, 4, 8")
        self.value_bits = value_bits
        if key_axis not in ("channel", "token"):
            raise ValueError(f"key_axis={key_axis!r}; allowed: channel, token")
        self.bits = bits
        self.key_axis = key_axis
        self.rotate = rotate
        self.key_group = key_group
        self.name = ((f"int{bits}" if value_bits == bits else f"k{bits}v{value_bits}")
                     + ("_tok" if key_axis == "token" else "")
                     + ("_rot" if rotate else ""))
        keys = (f"keys per channel in groups of {key_group} tokens" if key_axis == "channel"
                else "keys per token")
        vals = "values" if value_bits == bits else f"{value_bits}-bit values"
        self.doc = (f"{bits}-bit asymmetric codes, {keys}, {vals} per token, bf16 "
                    f"scale + zero point" + (", Hadamard-rotated" if rotate else ""))
        self.paper = ("KIVI arXiv:2402.02750" if key_axis == "channel" else
                      "per-token asymmetric (cf. KVQuant arXiv:2401.18079)")

    @property
    def token_local(self) -> bool:  # per-token keys: every parameter a token's own
        return self.key_axis == "token"

    # ------------------------------------------------------------ bytes
    def nbytes(self, n_tokens: int, head_dim: int) -> int:
        if n_tokens <= 0:
            return 0
        v = n_tokens * (head_dim * self.value_bits // 8 + 2 * PARAM_BYTES)
        if self.key_axis == "token":
            return v + n_tokens * (head_dim * self.bits // 8 + 2 * PARAM_BYTES)
        g = self.key_group
        groups = -(-n_tokens // g)
        return v + head_dim * groups * (g * self.bits // 8 + 2 * PARAM_BYTES)

    def bytes_per_token(self, head_dim: int, n_tokens: int = 1024) -> float:
        if self.key_axis == "channel":  # a whole number of groups
            n_tokens = max(self.key_group, n_tokens // self.key_group * self.key_group)
        return self.nbytes(n_tokens, head_dim) / n_tokens

    # ------------------------------------------------------------ values
    def _keys(self, k: torch.Tensor) -> torch.Tensor:
        a, n, d = k.shape
        if self.key_axis == "token":
            return quant.roundtrip(k, self.bits, d)
        g = self.key_group
        pad = -n % g
        if pad:
            k = torch.cat([k, k[:, -1:].expand(a, pad, d)], dim=1)
        q = quant.quantize(k.contiguous(), self.bits, g, "channel", torch.bfloat16)
        return quant.dequantize(q, self.bits, g, "channel", torch.float32)[:, :n]

    def _values(self, v: torch.Tensor) -> torch.Tensor:
        return quant.roundtrip(v, self.value_bits, v.shape[-1])

    def roundtrip(self, keys, values):
        dt = keys.dtype
        if keys.shape[1] == 0:
            return keys, values
        k = rotate(keys) if self.rotate else keys.float()
        v = rotate(values) if self.rotate else values.float()
        k, v = self._keys(k.contiguous()), self._values(v.contiguous())
        if self.rotate:
            k, v = rotate(k), rotate(v)
        return k.to(dt), v.to(values.dtype)

    def error_bound(self, x: torch.Tensor, axis: str) -> torch.Tensor:
        """Largest ``|x - roundtrip(x)|`` allowed per element of ``x [A, N, D]``
        (before rotation): half a step of its group plus the bf16 rounding of
        its zero point and scale (relative 2**-8 each, times the range)."""
        g = x.float()
        if axis == "channel":
            n = g.shape[1]
            grp = self.key_group
            pad = -n % grp
            if pad:
                g = torch.cat([g, g[:, -1:].expand(-1, pad, -1)], dim=1)
            gg = g.view(g.shape[0], -1, grp, g.shape[2])
            rng = (gg.amax(2) - gg.amin(2))[:, :, None].expand_as(gg).reshape(g.shape)[:, :n]
            mag = gg.abs().amax(2)[:, :, None].expand_as(gg).reshape(g.shape)[:, :n]
        else:
            rng = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)).expand_as(g)
            mag = g.abs().amax(-1, keepdim=True).expand_as(g)
        step = rng / (2**self.bits - 1)
        return step / 2 + 2**-8 * (mag + rng) + 1e-6
