"""Where each token's K and V live inside a paged KV-cache block.

vLLM's CPU cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
per layer, and the interior of each (block, head) region depends on the
attention ISA (keys are stored transposed for some).  Rather than hard-code
it, :func:`probe_layout` writes digit patterns through vLLM's own write op and
reads back which element holds which ``(token, dim)``.  The result is two index
maps, used to read keys for scoring and to move whole tokens (raw elements,
exact for every dtype) during compaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

_BASE = 8  # digits 1..8 are exact in every cache dtype, fp8 included


@dataclass(frozen=True)
class TokenLayout:
    """Element offsets of each token inside one (block, head) region.

    ``key_index[t, d]`` / ``value_index[t, d]``: flat offset of key / value
    element ``d`` of in-block token ``t`` within the region of
    ``region_size = 2 * block_size * head_size`` elements.
    """

    block_size: int
    head_size: int
    key_index: torch.Tensor  # [block_size, head_size] int64
    value_index: torch.Tensor  # [block_size, head_size] int64

    @property
    def region_size(self) -> int:
        return 2 * self.block_size * self.head_size

    @property
    def kind(self) -> str:
        """``"k_transposed"`` (K as ``[D, bs]``, V as ``[bs, D]``: vLLM's CPU
        "vec" layout), ``"row_major"`` (both ``[bs, D]``) or ``"generic"``."""
        bs, d = self.block_size, self.head_size
        t = torch.arange(bs)[:, None]
        j = torch.arange(d)[None, :]
        v_rows = bs * d + t * d + j
        if torch.equal(self.value_index, v_rows):
            if torch.equal(self.key_index, j * bs + t):
                return "k_transposed"
            if torch.equal(self.key_index, t * d + j):
                return "row_major"
        return "generic"

    @property
    def token_index(self) -> torch.Tensor:
        """``[block_size, 2 * head_size]``: K elements then V elements."""
        return torch.cat([self.key_index, self.value_index], dim=1)


WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def probe_layout(
    write: WriteFn,
    num_kv_heads: int,
    block_size: int,
    head_size: int,
    dtype: torch.dtype,
    read_dtype: torch.dtype | None = None,
) -> TokenLayout:
    """Discover the in-block layout by writing through ``write``.

    Args:
        write: ``write(key, value, kv_cache, slot_mapping)`` with ``key``/``value``
            ``[block_size, num_kv_heads, head_size]`` and ``kv_cache``
            ``[1, num_kv_heads, block_size, 2 * head_size]`` -- the engine's own
            cache-write op.
        dtype: storage dtype of the cache.
        read_dtype: dtype to reinterpret the storage as when reading back
            (e.g. ``torch.float8_e4m3fn`` for a ``uint8`` fp8 cache).
    """
    n = block_size * head_size
    digits = max(1, math.ceil(math.log(n, _BASE)))
    idx = torch.arange(n).view(block_size, head_size)
    slots = torch.arange(block_size, dtype=torch.int64)
    codes = {}
    for which in ("key", "value"):
        code = torch.zeros(2 * n, dtype=torch.int64)
        written = torch.zeros(2 * n, dtype=torch.bool)
        for p in range(digits):
            digit = (idx // _BASE**p) % _BASE + 1  # 1..8
            pattern = digit.to(torch.float32)[:, None, :].expand(
                block_size, num_kv_heads, head_size
            )
            zeros = torch.zeros_like(pattern)
            k, v = (pattern, zeros) if which == "key" else (zeros, pattern)
            cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
            write(k.contiguous(), v.contiguous(), cache, slots)
            view = cache.view(read_dtype) if read_dtype is not None else cache
            regions = view.to(torch.float32).reshape(num_kv_heads, 2 * n)
            if not torch.equal(regions, regions[:1].expand_as(regions)):
                raise RuntimeError("KV heads do not share one in-block layout")
            r = regions[0].round().to(torch.int64)
            written |= r > 0
            code += (r - 1).clamp(min=0) * _BASE**p
        if int(written.sum()) != n:
            raise RuntimeError(
                f"layout probe found {int(written.sum())} {which} elements per "
                f"region, expected {n}"
            )
        index = torch.full((n,), -1, dtype=torch.int64)
        positions = written.nonzero().flatten()
        index[code[positions]] = positions
        if (index < 0).any():
            raise RuntimeError(f"layout probe could not place every {which} element")
        codes[which] = index.view(block_size, head_size)
    return TokenLayout(block_size, head_size, codes["key"], codes["value"])


def read_keys(
    cache: torch.Tensor,
    layout: TokenLayout,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    fast: bool = True,
) -> torch.Tensor:
    """Keys of the given tokens: ``[num_kv_heads, n, head_size]`` (cache dtype).

    Args:
        cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
        blocks, offsets: ``[n]`` block id and in-block index of each token.
        fast: use a strided view when the layout is a known one (the generic
            index-map path gives the same result; tests compare them).
    """
    if fast and layout.kind != "generic":
        return read_keys_stacked(cache[None], layout, blocks, offsets)[0]
    return _gather(cache, layout.key_index, blocks, offsets)


def _gather(cache: torch.Tensor, index: torch.Tensor, blocks: torch.Tensor,
            offsets: torch.Tensor) -> torch.Tensor:
    """Index-map read of one half (``index``: the layout's key or value map):
    ``[num_kv_heads, n, head_size]``."""
    nb, h = cache.shape[:2]
    flat = cache.view(nb, h, -1)
    idx = index[offsets]  # [n, D]
    # [n, 1, D] block x [1, H, 1] head -> [n, H, D]
    heads = torch.arange(h)[None, :, None]
    out = flat[blocks[:, None, None], heads, idx[:, None, :]]
    return out.permute(1, 0, 2)


def move_tokens(
    cache: torch.Tensor,
    layout: TokenLayout,
    src_blocks: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_blocks: torch.Tensor,
    dst_offsets: torch.Tensor,
    fast: bool = True,
) -> None:
    """Copy whole tokens (K and V, raw elements) inside one layer's cache.

    Per KV head ``h`` and kept index ``i``: token ``(src_blocks[h, i],
    src_offsets[h, i])`` goes to ``(dst_blocks[i], dst_offsets[i])``.  All
    sources are read before any destination is written, so sources and
    destinations may overlap (in-place compaction).

    Args:
        cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
        src_blocks, src_offsets: ``[num_kv_heads, k]``.
        dst_blocks, dst_offsets: ``[k]``.
    """
    if fast and layout.kind != "generic":
        return move_tokens_stacked(cache[None], layout, src_blocks[None],
                                   src_offsets[None], dst_blocks, dst_offsets)
    nb, h = cache.shape[:2]
    flat = cache.view(nb, h, layout.region_size)
    tok = layout.token_index  # [bs, 2D]
    heads = torch.arange(h)[:, None, None]  # [H, 1, 1]
    values = flat[src_blocks[:, :, None], heads, tok[src_offsets]]  # [H, k, 2D]
    flat[dst_blocks[None, :, None], heads, tok[dst_offsets][None]] = values


def row_slots(
    block_ids: list[int] | torch.Tensor, positions: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, in-block offset) of physical positions in a block-table row."""
    table = torch.as_tensor(block_ids, dtype=torch.int64)
    return table[positions // block_size], positions % block_size


def _stacked_halves(stack: torch.Tensor, layout: TokenLayout):
    l, nb, h = stack.shape[:3]
    bs, d = layout.block_size, layout.head_size
    flat = stack.view(l, nb, h, 2, bs * d)
    k_shape = (l, nb, h, d, bs) if layout.kind == "k_transposed" else (l, nb, h, bs, d)
    return flat[:, :, :, 0].view(k_shape), flat[:, :, :, 1].view(l, nb, h, bs, d)


def read_keys_stacked(
    stack: torch.Tensor, layout: TokenLayout, blocks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Keys of the given tokens in every layer: ``[L, H, n, D]``.

    Args:
        stack: ``[L, num_blocks, H, block_size, 2D]`` from
            :func:`~vllm_kvshrink.kernels.layouts.stack_layers` (``contiguous=True``).
        blocks, offsets: ``[n]``.
    """
    if layout.kind == "generic":
        return torch.stack([read_keys(c, layout, blocks, offsets, fast=False)
                            for c in stack])
    k, _ = _stacked_halves(stack, layout)
    # Advanced indices split by a slice: the indexed axis comes first, [n, L, H, D].
    if layout.kind == "k_transposed":
        out = k[:, blocks, :, :, offsets]
    else:
        out = k[:, blocks, :, offsets]
    return out.permute(1, 2, 0, 3)


def read_row_stacked(
    stack: torch.Tensor, layout: TokenLayout, blocks: list[int] | torch.Tensor, n: int,
    half: str,
) -> torch.Tensor:
    """Keys (``half="keys"``) or values (``"values"``) of the first ``n``
    tokens of a block-table row in every layer: ``[L, H, n, D]``, as
    :func:`read_keys_stacked` / :func:`read_values_stacked` give them for the
    row's slots, but read a block at a time (one index per block, not one per
    element).

    Args:
        stack: ``[L, num_blocks, H, block_size, 2D]`` (see
            :func:`read_keys_stacked`).
        blocks: the row's block ids (at least ``ceil(n / block_size)``).
    """
    if half not in ("keys", "values"):
        raise ValueError(f"half must be 'keys' or 'values', got {half!r}")
    bs = layout.block_size
    if layout.kind == "generic":
        reader = read_keys_stacked if half == "keys" else read_values_stacked
        return reader(stack, layout, *row_slots(blocks, torch.arange(n), bs))
    nb = -(-n // bs)
    table = torch.as_tensor(blocks, dtype=torch.int64)[:nb]
    k, v = _stacked_halves(stack, layout)
    l, h, d = stack.shape[0], stack.shape[2], layout.head_size
    # an [L, H, NB, bs, D] view, then one gather of the row's blocks
    if half == "values":
        x = v.permute(0, 2, 1, 3, 4)
    elif layout.kind == "k_transposed":
        x = k.permute(0, 2, 1, 4, 3)
    else:
        x = k.permute(0, 2, 1, 3, 4)
    return x[:, :, table].reshape(l, h, nb * bs, d)[:, :, :n]


def move_tokens_stacked(
    stack: torch.Tensor,
    layout: TokenLayout,
    src_blocks: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_blocks: torch.Tensor,
    dst_offsets: torch.Tensor,
) -> None:
    """:func:`move_tokens` for every layer at once.

    Args:
        src_blocks, src_offsets: ``[L, H, k]``; dst_blocks, dst_offsets: ``[k]``.
    """
    if layout.kind == "generic":
        for i, c in enumerate(stack):
            move_tokens(c, layout, src_blocks[i], src_offsets[i], dst_blocks, dst_offsets,
                        fast=False)
        return
    l, _, h = stack.shape[:3]
    k, v = _stacked_halves(stack, layout)
    li = torch.arange(l)[:, None, None]
    hi = torch.arange(h)[None, :, None]
    db, do = dst_blocks[None, None, :], dst_offsets[None, None, :]
    v_vals = v[li, src_blocks, hi, src_offsets]  # [L, H, k, D]
    if layout.kind == "k_transposed":
        k_vals = k[li, src_blocks, hi, :, src_offsets]
        k[li, db, hi, :, do] = k_vals
    else:
        k_vals = k[li, src_blocks, hi, src_offsets]
        k[li, db, hi, do] = k_vals
    v[li, db, hi, do] = v_vals


def read_values_stacked(
    stack: torch.Tensor, layout: TokenLayout, blocks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Values of the given tokens in every layer: ``[L, H, n, D]`` (storage dtype)."""
    if layout.kind == "generic":  # e.g. the AMX layout: index maps, layer by layer
        return torch.stack([_gather(c, layout.value_index, blocks, offsets) for c in stack])
    _, v = _stacked_halves(stack, layout)
    return v[:, blocks, :, offsets].permute(1, 2, 0, 3)


def _to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:  # fp8 (e4m3) cache stored as bytes
        return x.to(torch.float8_e4m3fn).view(torch.uint8)
    return x.to(dtype)


def write_tokens_stacked(
    stack: torch.Tensor,
    layout: TokenLayout,
    keys: torch.Tensor,
    values: torch.Tensor,
    dst_blocks: torch.Tensor,
    dst_offsets: torch.Tensor,
) -> None:
    """Write per-(layer, head) keys and values ``[L, H, k, D]`` to the slots
    ``dst_blocks, dst_offsets`` of every layer (new content, e.g. merged
    tokens; values are cast to the cache's dtype): ``[k]``, the same slots in
    every (layer, head), or ``[L, H, k]``, each its own."""
    per_row = dst_blocks.dim() == 3
    if layout.kind == "generic":  # e.g. the AMX layout: index maps, layer by layer
        nb, h = stack.shape[1:3]
        heads = torch.arange(h)[:, None, None]  # [H, 1, 1]
        for i, c in enumerate(stack):
            b, o = (dst_blocks[i], dst_offsets[i]) if per_row else (dst_blocks[None],
                                                                    dst_offsets[None])
            kidx, vidx = layout.key_index[o], layout.value_index[o]  # [H or 1, k, D]
            flat = c.view(nb, h, layout.region_size)
            flat[b[..., None], heads, kidx] = _to_storage(keys[i], stack.dtype)
            flat[b[..., None], heads, vidx] = _to_storage(values[i], stack.dtype)
        return
    l, _, h = stack.shape[:3]
    k, v = _stacked_halves(stack, layout)
    li = torch.arange(l)[:, None, None]
    hi = torch.arange(h)[None, :, None]
    if per_row:
        db, do = dst_blocks, dst_offsets
    else:
        db, do = dst_blocks[None, None, :], dst_offsets[None, None, :]
    kv = _to_storage(keys, stack.dtype)
    vv = _to_storage(values, stack.dtype)
    if layout.kind == "k_transposed":
        k[li, db, hi, :, do] = kv
    else:
        k[li, db, hi, do] = kv
    v[li, db, hi, do] = vv
