"""Paged KV-cache layouts the kernels understand, as strided K and V views.

Every layout is reduced to two views of the same storage, ``K`` and ``V``,
each ``[L, num_blocks, H, block_size, D]`` (element strides arbitrary), so the
kernels never branch on the layout:

``"flash"`` (vLLM's CUDA flash-attention backend), one layer
    ``[num_blocks, 2, block_size, H, D]``; stacked ``[L, num_blocks, 2, block_size, H, D]``.
``"cpu_k_transposed"`` (vLLM's CPU backend, "vec" ISA), one layer
    ``[num_blocks, H, block_size, 2 * D]`` where each (block, head) region holds K
    transposed (``[D, block_size]``) then V row-major (``[block_size, D]``);
    stacked ``[L, num_blocks, H, block_size, 2 * D]``.
``"cpu_row_major"``: as ``cpu_k_transposed`` with K row-major too.

The CPU names match ``TokenLayout.kind`` of ``vllm_kvshrink.serving.worker.kv_layout``
(``"k_transposed"`` / ``"row_major"``); its ``"generic"`` kind has no strided
form and is not supported here.
"""

from __future__ import annotations

import torch

from vllm_kvshrink.kernels._checks import check_choice, check_tensor

LAYOUTS = ("flash", "cpu_k_transposed", "cpu_row_major")
_TOKEN_LAYOUT_KIND = {"k_transposed": "cpu_k_transposed", "row_major": "cpu_row_major"}


def layout_from_kind(kind: str) -> str:
    """Kernel layout name for a ``TokenLayout.kind`` of the CPU cache."""
    if kind not in _TOKEN_LAYOUT_KIND:
        raise ValueError(
            f"TokenLayout kind {kind!r} has no strided form; allowed: "
            f"{tuple(_TOKEN_LAYOUT_KIND)}"
        )
    return _TOKEN_LAYOUT_KIND[kind]


def cache_dims(cache: torch.Tensor, layout: str, name: str = "cache") -> tuple[int, ...]:
    """``(L, num_blocks, H, block_size, D)`` of a stacked cache."""
    check_choice("layout", layout, LAYOUTS)
    check_tensor(name, cache, ndim=6 if layout == "flash" else 5)
    if layout == "flash":
        l, nb, two, bs, h, d = cache.shape
        if two != 2:
            raise ValueError(
                f"{name} in the flash layout must be [L, num_blocks, 2, block_size, "
                f"H, D], got shape {tuple(cache.shape)}"
            )
    else:
        l, nb, h, bs, d2 = cache.shape
        if d2 % 2:
            raise ValueError(
                f"{name} in a CPU layout must be [L, num_blocks, H, block_size, 2*D], "
                f"got an odd last dimension in shape {tuple(cache.shape)}"
            )
        d = d2 // 2
    return l, nb, h, bs, d


def kv_views(cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``K`` and ``V`` views ``[L, num_blocks, H, block_size, D]`` of ``cache``."""
    l, nb, h, bs, d = cache_dims(cache, layout)
    if layout == "flash":
        return cache[:, :, 0].permute(0, 1, 3, 2, 4), cache[:, :, 1].permute(0, 1, 3, 2, 4)
    s_l, s_b, s_h, s_t, s_e = cache.stride()
    if s_e != 1 or s_t != 2 * d:
        raise ValueError(
            f"cache in layout {layout!r} must have each (block, head) region "
            f"contiguous (strides [..., {2 * d}, 1]), got strides {cache.stride()}"
        )
    half = bs * d  # V starts after the K half of the region
    k_strides = (s_l, s_b, s_h, 1, bs) if layout == "cpu_k_transposed" else (s_l, s_b, s_h, d, 1)
    off = cache.storage_offset()
    k = torch.as_strided(cache, (l, nb, h, bs, d), k_strides, off)
    v = torch.as_strided(cache, (l, nb, h, bs, d), (s_l, s_b, s_h, d, 1), off + half)
    return k, v


def stack_layers(caches: list[torch.Tensor], contiguous: bool = False
                 ) -> torch.Tensor | None:
    """One ``[L, ...]`` view of per-layer caches that are equally shaped slices
    of one allocation at a constant stride (as vLLM allocates them), so a
    single launch (or one gather / scatter) reaches every layer; ``None`` when
    they are not.

    ``contiguous``: also require every layer contiguous and the layers back to
    back (no gap between them), so the whole stack is one contiguous block --
    what the worker's token moves (:mod:`vllm_kvshrink.serving.worker.kv_layout`)
    reshape; the kernels take any constant stride."""
    if not caches:
        raise ValueError("caches must hold at least one layer, got an empty list")
    c0 = caches[0]
    if contiguous and not c0.is_contiguous():
        return None
    storage = c0.untyped_storage().data_ptr()
    step = caches[1].storage_offset() - c0.storage_offset() if len(caches) > 1 else c0.numel()
    for i, c in enumerate(caches):
        if (
            c.shape != c0.shape
            or c.stride() != c0.stride()
            or c.dtype != c0.dtype
            or c.device != c0.device
            or c.untyped_storage().data_ptr() != storage
            or c.storage_offset() != c0.storage_offset() + i * step
        ):
            return None
    if step <= 0 or (contiguous and step != c0.numel()):
        return None
    return torch.as_strided(
        c0, (len(caches),) + tuple(c0.shape), (step,) + c0.stride(), c0.storage_offset()
    )
