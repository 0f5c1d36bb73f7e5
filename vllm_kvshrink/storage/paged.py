"""Packed pages: how the engine holds tokens of a quantized form inside one
of vLLM's KV-cache blocks.

vLLM gives each layer a tensor of pages, ``[num_blocks, Hkv, bs, 2D]`` in the
model dtype; one (block, KV head) *region* is ``2 * bs * D`` elements, i.e.
``region_bytes = 2 * bs * D * elem_bytes`` bytes.  A block in a packed form
reinterprets every region of every layer as bytes and holds up to ``n`` tokens
of that form (``n`` = :meth:`PagedForm.capacity`, the form's
:meth:`~.base.StorageForm.tokens_per_page`), laid out as::

    [0, n*kc)                 key codes,   n x kc bytes   (kc = D * k_bits / 8)
    [n*kc, n*(kc+vc))         value codes, n x vc bytes   (vc = D * v_bits / 8)
    [n*(kc+vc), +8n)          n x (k_scale, k_zero, v_scale, v_zero) in bf16

``n`` is the page's capacity, fixed per form, so a page that is not full
keeps the same offsets.  Codes are the quantizer's (:func:`vllm_kvshrink.
kernels.quantize`, per token over the head's channels); a ``_rot`` form
stores ``x @ H`` (:mod:`.hadamard`) and attention reads it in the rotated
space (queries rotated, the output rotated back once).  Only token-axis forms
(``*_tok``) can be paged: a per-channel key group spans tokens, and a
low-rank form's (:mod:`.lowrank`) basis and mean are shared by a whole row.

This module is the format's one definition: the worker packs with
:func:`pack`, the kernels (C++, Triton) read what it writes, and
:func:`unpack` / :func:`attention_ref` are the plain PyTorch reference both
kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from vllm_kvshrink.kernels import ops
from vllm_kvshrink.policy.nbytes import token_bytes
from vllm_kvshrink.storage import get_form
from vllm_kvshrink.storage.hadamard import rotate

PARAMS = 4  # bf16 values per token: k_scale, k_zero, v_scale, v_zero


@dataclass(frozen=True)
class PagedForm:
    """A token-axis integer form as the engine's pages hold it."""

    name: str
    k_bits: int
    v_bits: int
    rotate: bool
    head_dim: int
    region_bytes: int

    @property
    def key_bytes(self) -> int:
        return self.head_dim * self.k_bits // 8

    @property
    def value_bytes(self) -> int:
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


def unpageable_reason(name: str) -> str | None:
    """Why form ``name`` cannot be held in the engine's packed pages (a
    phrase with the form as its subject), ``None`` if it can: ``bf16`` and
    the token-axis integer forms (every token's codes and parameters its
    own) can."""
    from vllm_kvshrink.storage.lowrank import LowRankForm
    from vllm_kvshrink.storage.quantized import IntForm

    f = get_form(name)
    if name == "bf16" or (isinstance(f, IntForm) and f.key_axis == "token"):
        return None
    if isinstance(f, LowRankForm):
        return ("keeps keys on a per-row basis (a mean and a low-rank basis per "
                "(layer, KV head) shared by all its tokens)")
    if getattr(f, "key_axis", None) == "channel":
        return "keeps keys per channel in groups of tokens"
    return "is not a token-axis integer form"


def pageable(name: str) -> bool:
    """Whether form ``name`` can be held in the engine's packed pages."""
    return unpageable_reason(name) is None


@lru_cache(maxsize=64)
def paged_form(name: str, head_dim: int, block_size: int, elem_bytes: int) -> PagedForm:
    """The paged layout of form ``name`` (a ``*_tok`` form of
    :mod:`.quantized`) in pages of ``block_size`` tokens of ``elem_bytes``."""
    from vllm_kvshrink.storage.lowrank import LowRankForm

    f = get_form(name)
    if getattr(f, "key_axis", None) != "token":
        why = ("a per-row basis and mean, shared by all its tokens"
               if isinstance(f, LowRankForm) else "per-channel groups")
        raise ValueError(
            f"storage form {name!r} cannot be held in the engine's packed blocks: "
            f"its keys share parameters across tokens ({why}); "
            f"allowed in the engine: bf16 and the token-axis forms (*_tok, *_tok_rot)")
    pf = PagedForm(name, f.bits, f.value_bits, f.rotate, head_dim,
                   block_size * token_bytes(1, head_dim, elem_bytes))
    if pf.capacity != f.tokens_per_page(head_dim, block_size, elem_bytes):
        raise AssertionError(f"{name}: page capacity disagrees with the form's bytes")
    if pf.capacity < 1:
        raise ValueError(f"a page of {pf.region_bytes} bytes holds no {name} token")
    return pf


def _quantize(x: torch.Tensor, bits: int):
    d = x.shape[-1]
    return ops.quantize(x.contiguous(), bits, d, "token", torch.bfloat16)


def pack(pf: PagedForm, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pack ``keys``/``values`` ``[A, N, D]`` (any float dtype, as attention
    sees them: unrotated) into ``ceil(N / capacity)`` pages per row:
    ``[A, P, region_bytes]`` uint8, tokens in order, the last page partly
    filled (its unused bytes zero)."""
    a, n, d = keys.shape
    cap = pf.capacity
    pages = -(-n // cap)
    k = rotate(keys) if pf.rotate else keys.float()
    v = rotate(values) if pf.rotate else values.float()
    qk, qv = _quantize(k, pf.k_bits), _quantize(v, pf.v_bits)
    pad = pages * cap - n
    params = torch.stack([qk.scale[..., 0], qk.zero[..., 0], qv.scale[..., 0],
                          qv.zero[..., 0]], dim=-1)  # [A, N, 4] bf16

    def padded(t: torch.Tensor) -> torch.Tensor:  # [A, N, X] -> [A, P, cap * X]
        if pad:
            t = torch.cat([t, t.new_zeros(a, pad, t.shape[-1])], dim=1)
        return t.reshape(a, pages, cap * t.shape[-1])

    body = torch.cat([padded(qk.packed), padded(qv.packed),
                      padded(params.contiguous().view(torch.uint8))], dim=-1)
    out = torch.zeros(a, pages, pf.region_bytes, dtype=torch.uint8)
    out[..., : body.shape[-1]] = body
    return out


def unpack(pf: PagedForm, pages: torch.Tensor, n: int, rotated: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` tokens of ``pages`` ``[A, P, region_bytes]``:
    ``(keys, values)`` ``[A, n, D]`` float32, rotated back unless ``rotated``
    (the stored space, what a kernel reads)."""
    a, p, _ = pages.shape
    cap, d = pf.capacity, pf.head_dim
    ko, vo, po = pf.offsets()
    kc = pages[..., ko:vo].reshape(a, p * cap, pf.key_bytes)[:, :n]
    vc = pages[..., vo:po].reshape(a, p * cap, pf.value_bytes)[:, :n]
    par = (pages[..., po: po + cap * 2 * PARAMS].contiguous().view(torch.bfloat16)
           .reshape(a, p * cap, PARAMS)[:, :n])
    k = ops.dequantize(ops.Quantized(kc.contiguous(), par[..., 0:1].contiguous(),
                                     par[..., 1:2].contiguous()),
                       pf.k_bits, d, "token", torch.float32)
    v = ops.dequantize(ops.Quantized(vc.contiguous(), par[..., 2:3].contiguous(),
                                     par[..., 3:4].contiguous()),
                       pf.v_bits, d, "token", torch.float32)
    if pf.rotate and not rotated:
        k, v = rotate(k), rotate(v)
    return k, v


def region_view(cache: torch.Tensor) -> torch.Tensor:
    """One layer's cache ``[NB, Hkv, bs, 2D]`` as bytes ``[NB, Hkv, region_bytes]``."""
    nb, h = cache.shape[:2]
    return cache.view(torch.uint8).view(nb, h, -1)


# ----------------------------------------------------------------- reference
@dataclass
class Segment:
    """``n`` tokens of form ``pf`` in block ``block`` (every layer, every head)."""

    block: int
    pf: PagedForm
    n: int


def read_segments(cache: torch.Tensor, segments: list[Segment]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K/V of one layer's packed segments, ``[Hkv, N, D]`` float32
    each (rotated back), in segment order."""
    regions = region_view(cache)
    h = cache.shape[1]
    d = cache.shape[3] // 2
    ks, vs = [torch.zeros(h, 0, d)], [torch.zeros(h, 0, d)]
    for s in segments:
        k, v = unpack(s.pf, regions[s.block][:, None], s.n)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 1), torch.cat(vs, 1)


def attention_ref(q: torch.Tensor, k_plain: torch.Tensor, v_plain: torch.Tensor,
                  k_packed: torch.Tensor, v_packed: torch.Tensor, scale: float
                  ) -> torch.Tensor:
    """Attention of one request: ``q [T, Hq, D]`` (its last ``T`` tokens, the
    newest of the plain region), causal over ``k_plain/v_plain [Hkv, S, D]``
    (the bf16 region, ``S >= T``), and every packed token ``[Hkv, N, D]``
    (older than every query).  Dequantize, then softmax: the reference both
    kernels are checked against.  Returns ``[T, Hq, D]`` float32."""
    t, hq, d = q.shape
    hkv, s = k_plain.shape[:2]
    g = hq // hkv
    k = torch.cat([k_packed.float(), k_plain.float()], 1)  # [Hkv, N + S, D]
    v = torch.cat([v_packed.float(), v_plain.float()], 1)
    n = k_packed.shape[1]
    qq = q.float().view(t, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    logits = torch.einsum("hgtd,hnd->hgtn", qq, k) * scale
    pos = torch.arange(n + s)
    limit = n + s - t + torch.arange(t)  # query i sees up to its own token
    visible = pos[None, :] <= limit[:, None]
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("hgtn,hnd->hgtd", p, v)
    return out.permute(2, 0, 1, 3).reshape(t, hq, d)

