"""``lr<r>_int<b>``: keys as a per-row low-rank projection plus a quantized
residual, values per token -- a multi-scale form, research path only.

Per (layer, KV head) row of ``N`` keys ``k [N, D]``:

* ``mu [D]``: the row's mean key, and ``B [r, D]``: an orthonormal basis, the
  top-``r`` right singular vectors of the centred keys ``k - mu`` (one float32
  SVD, ``torch.linalg.svd``), both stored in bf16.  The basis is *calibrated
  online*: every time the form packs a set of tokens it is computed from
  exactly those tokens (in the tier policy, every event re-packs what each
  level holds, so the basis always covers the tokens in the form);
* ``c [N, r] = (k - mu) @ B^T`` per token, stored in bf16 (projected with the
  bf16-rounded ``mu`` and ``B``, the ones that are stored);
* the residual ``res = k - (mu + c @ B)``, computed *after* ``mu``, ``c`` and
  ``B`` are rounded to bf16, so the reconstruction error is the residual
  quantizer's alone, quantized per token over the ``D`` channels with ``bits``
  (2, 4 or 8) asymmetric codes and a bf16 scale and zero point (the
  quantizer of :mod:`vllm_kvshrink.kernels.quant`, as :class:`~.quantized.IntForm`
  uses it with ``key_axis="token"``).

Keys are read back as ``mu + c @ B + dequantize(res)``.  Values are held per
token with ``value_bits`` codes and a bf16 scale and zero point, exactly as
:class:`~.quantized.IntForm`'s values.

Exact bytes of ``n`` tokens of one (layer, KV head)::

    basis + mean:  (r * D + D) * 2                    (once per row, if n > 0)
    keys:          n * (r * 2 + D * bits / 8 + 4)     (bf16 coefficients,
                                                       residual codes, bf16
                                                       scale + zero point)
    values:        n * (D * value_bits / 8 + 4)

and ``nbytes(0, D) == 0``.  E.g. ``D = 64``, ``r = 8``, int2: 1,152 bytes per
row plus 36 + 20 = 56 bytes per token; 57.1 per token at 1,024 tokens
(amortised, :meth:`~.base.StorageForm.bytes_per_token`) against 40 for
``int2_tok`` and 256 for bf16.  A row holding fewer tokens than ``r`` (``N <
r``) is fitted with rank ``min(r, N)`` (centred keys have rank below ``N``
anyway); the basis is stored with ``r`` rows all the same, the unused ones
zero, so it is charged as above.

The per-row basis and mean are shared by all the row's tokens: the engine's
packed pages (:mod:`.paged`, one self-contained token after another) cannot
hold them, so the engine refuses these forms by name; they run in the
research path (:mod:`vllm_kvshrink.lab.hf.research`).

Prior art: low-rank projection of the KV cache, Palu (Chang et al. 2024,
arXiv:2407.21118); low-rank keys for attention, Loki (Singhania et al. 2024,
arXiv:2406.02542); quantization combined with a low-rank approximation of
its error (plus a sparse outlier matrix), GEAR (Kang et al. 2024,
arXiv:2403.05527).  Here the order is the other way round -- the low-rank
part first, fitted to the keys, and the residual quantized -- with no sparse
part.
"""

from __future__ import annotations

import torch

from vllm_kvshrink.kernels import quant
from vllm_kvshrink.policy import nbytes as policy_nbytes
from vllm_kvshrink.storage.base import StorageForm
from vllm_kvshrink.storage.quantized import PARAM_BYTES, IntForm

BASIS_BYTES = 2  # mean, basis and coefficients in bf16
_STORE = torch.bfloat16


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16, back in float32."""
    return x.to(_STORE).float()


class LowRankForm(StorageForm):
    """Keys: per-row mean + rank-``rank`` basis (bf16), per-token bf16
    coefficients and a per-token ``bits``-bit residual; values per token with
    ``value_bits`` (default ``bits``)."""

    #: the residual is not rotated (for code that asks every form)
    rotate = False

    def __init__(self, rank: int, bits: int = 2, value_bits: int | None = None) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} is not supported; allowed: an integer >= 1 "
                             f"and below the head dimension")
        if bits not in (2, 4, 8) or isinstance(bits, bool):
            raise ValueError(f"bits={bits!r} is not supported; allowed: 2, 4, 8")
        value_bits = bits if value_bits is None else value_bits
        if value_bits not in (2, 4, 8) or isinstance(value_bits, bool):
            raise ValueError(f"value_bits={value_bits!r} is not supported; allowed: 2, 4, 8")
        self.rank = rank
        self.bits = bits
        self.value_bits = value_bits
        self.name = (f"lr{rank}_int{bits}" if value_bits == bits
                     else f"lr{rank}_k{bits}v{value_bits}")
        vals = "values" if value_bits == bits else f"{value_bits}-bit values"
        self.doc = (f"keys as a per-row mean + rank-{rank} SVD basis (bf16, fitted to "
                    f"the tokens held), bf16 coefficients and a {bits}-bit per-token "
                    f"residual; {vals} per token, bf16 scale + zero point; research "
                    f"path only")
        self.paper = ("low-rank keys: Palu arXiv:2407.21118, Loki arXiv:2406.02542; "
                      "quantization + low-rank residual: GEAR arXiv:2403.05527")

    # ------------------------------------------------------------ bytes
    def _check_dim(self, head_dim: int) -> None:
        if self.rank >= head_dim:
            raise ValueError(f"rank={self.rank} is not supported at head_dim={head_dim}; "
                             f"allowed: 1 <= rank < {head_dim}")
        if head_dim * min(self.bits, self.value_bits) % 8:
            raise ValueError(f"head_dim={head_dim} does not pack into whole bytes at "
                             f"{min(self.bits, self.value_bits)} bits")

    def row_bytes(self, head_dim: int) -> int:
        """Fixed bytes of one row holding any token: basis + mean in bf16."""
        return (self.rank * head_dim + head_dim) * BASIS_BYTES

    def token_bytes(self, head_dim: int) -> int:
        """Bytes of each token: coefficients, residual and value codes, and
        the residual's and value's bf16 scale and zero point."""
        keys = self.rank * BASIS_BYTES + head_dim * self.bits // 8 + 2 * PARAM_BYTES
        return keys + head_dim * self.value_bits // 8 + 2 * PARAM_BYTES

    def nbytes(self, n_tokens: int, head_dim: int) -> int:
        self._check_dim(head_dim)
        if n_tokens <= 0:
            return 0
        return self.row_bytes(head_dim) + n_tokens * self.token_bytes(head_dim)

    def tokens_per_page(self, head_dim: int, block_size: int, elem_bytes: int = 2) -> int:
        """Most tokens whose :meth:`nbytes` fit one page's bytes (a bound on
        the bytes only: the engine cannot hold this form)."""
        page = block_size * policy_nbytes.token_bytes(1, head_dim, elem_bytes)
        return max(0, (page - self.row_bytes(head_dim)) // self.token_bytes(head_dim))

    def describe(self, head_dim: int | None = None, block_size: int | None = None) -> str:
        """As the base class, without a page capacity (no engine page holds
        this form)."""
        if head_dim is None:
            return self.doc
        per = self.bytes_per_token(head_dim)
        return (f"{per:.2f} B/token/head ({per / (4 * head_dim):.3f} of bf16, "
                f"{self.row_bytes(head_dim):,} B per row + "
                f"{self.token_bytes(head_dim)} B per token); {self.doc}")

    # ------------------------------------------------------------ values
    def _fit(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k [A, N, D]`` float32 -> ``(low-rank part, residual, rank used)``:
        ``mu_b + c_b @ B_b`` and ``k`` minus it, both float32 ``[A, N, D]``."""
        a, n, d = k.shape
        r = min(self.rank, n)
        mu = _bf16(k.mean(dim=1, keepdim=True))  # [A, 1, D]
        centred = k - mu
        # Right singular vectors of the centred keys; float32, deterministic.
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # [A, min(N,D), D]
        basis = _bf16(vh[:, :r])  # [A, r, D]
        coef = _bf16(centred @ basis.transpose(1, 2))  # [A, N, r]
        low = mu + coef @ basis
        return low, k - low, r

    def _keys(self, k: torch.Tensor) -> torch.Tensor:
        d = k.shape[-1]
        low, res, _ = self._fit(k)
        q = quant.quantize(res.contiguous(), self.bits, d, "token", torch.bfloat16)
        return low + quant.dequantize(q, self.bits, d, "token", torch.float32)

    def _values(self, v: torch.Tensor) -> torch.Tensor:
        d = v.shape[-1]
        q = quant.quantize(v.contiguous(), self.value_bits, d, "token", torch.bfloat16)
        return quant.dequantize(q, self.value_bits, d, "token", torch.float32)

    def roundtrip(self, keys, values):
        if keys.shape[1] == 0:
            return keys, values
        self._check_dim(keys.shape[-1])
        k = self._keys(keys.float().contiguous())
        v = self._values(values.float())
        return k.to(keys.dtype), v.to(values.dtype)

    def residual(self, keys: torch.Tensor) -> torch.Tensor:
        """The residual the form quantizes, ``[A, N, D]`` float32."""
        return self._fit(keys.float().contiguous())[1]

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Largest ``|x - roundtrip(x)|`` allowed per key element of ``x [A,
        N, D]``.

        The low-rank part is exact in what is stored (``mu``, ``c``, ``B``
        rounded to bf16 *before* the residual is taken), so the error is the
        residual quantizer's: per token, half a step of the residual's range
        ``(max - min) / (2**bits - 1)`` plus the bf16 rounding of its zero
        point and scale (relative ``2**-8`` each, times the residual's
        magnitude and range) -- :meth:`IntForm.error_bound`'s per-token branch
        applied to the residual -- plus the float32 arithmetic of adding the
        parts back (``4 * eps32 * (|x| + |res|max)``) and, for an input below
        float32, the rounding of the result to its dtype (``eps / 2`` of it).
        """
        res = self.residual(x)
        bound = IntForm(self.bits, "token").error_bound(res, "token")
        mag = res.abs().amax(-1, keepdim=True)
        bound = bound + 4 * torch.finfo(torch.float32).eps * (x.float().abs() + mag)
        if x.dtype != torch.float32:
            bound = bound + torch.finfo(x.dtype).eps / 2 * (x.float().abs() + bound)
        return bound


__all__ = ["LowRankForm"]
