"""Attention over requests whose cache is partly held in packed blocks: the
entry point the engine's attention (:mod:`vllm_kvshrink.serving.attention.cpu`)
calls, choosing the backend.

The kernels (C++ on the CPU, :mod:`.cpu_ext`; Triton on GPUs,
:mod:`.triton_packed`) dequantize inside the dot products;
:func:`~.packed_reference.reference` dequantizes everything first, then
attends, and is what both are tested against.  The batch they take is
:class:`~.packed_batch.PackedBatch`.
"""

from __future__ import annotations

import logging

import torch

from vllm_kvshrink.kernels import cpu_ext
from vllm_kvshrink.kernels.packed_batch import PackedBatch, check
from vllm_kvshrink.kernels.packed_reference import reference

_WARNED: list = []


def _auto(q: torch.Tensor) -> str:
    if q.is_cuda:
        return "triton"
    impl = "cpu" if cpu_ext.load() else "reference"
    if impl == "reference" and not _WARNED:
        _WARNED.append(True)
        logging.getLogger("vllm.kvshrink").warning(
            "vllm-kvshrink: the C++ packed-attention kernel is not available "
            "(%s); packed blocks are attended by the PyTorch reference, which is "
            "much slower (build it: python -m vllm_kvshrink.kernels.cpu_ext build)",
            cpu_ext.unavailable_reason())
    return impl


def packed_attention_into(q: torch.Tensor, cache: torch.Tensor, layout: str,
                          batch: PackedBatch, scale: float, output: torch.Tensor,
                          impl: str = "auto") -> None:
    """:func:`packed_attention`, each packed request's rows written into
    ``output`` ``[T, Hq, D]`` at its own query rows (the C++ kernel writes
    them there itself, in ``output``'s dtype; the other backends' rows are
    copied in)."""
    impl = _auto(q) if impl == "auto" else impl
    if impl == "cpu":
        cpu_ext.packed_attention_into(q, cache, layout, batch, scale, output)
        return
    rows = packed_attention(q, cache, layout, batch, scale, impl)
    output.index_copy_(0, batch.row_index().to(output.device), rows.to(output.dtype))


def packed_attention(q: torch.Tensor, cache: torch.Tensor, layout: str,
                     batch: PackedBatch, scale: float, impl: str = "auto") -> torch.Tensor:
    """Attention of the packed requests of a step over one layer's cache.

    Args:
        q: ``[T, Hq, D]`` this step's queries (the whole flattened batch).
        cache: ``[NB, Hkv, bs, 2D]`` one layer's pages (plain blocks in
            ``layout``, packed blocks as :mod:`.quant` lays them out).
        batch: the step's packed requests (same for every layer).
        scale: the softmax scale of the logits.
        impl: ``"reference"``, ``"cpu"`` (the C++ kernel), ``"triton"``, or
            ``"auto"`` (the C++ kernel for CPU tensors when it is built, the
            Triton kernel on GPUs, else the reference).

    Returns:
        ``[sum(q_len), Hq, D]`` float32, each request's rows in batch order.
    """
    if impl == "auto":
        impl = _auto(q)
    if impl == "reference":
        return reference(q, cache, layout, batch, scale)
    if impl == "cpu":  # checks once per batch itself
        return cpu_ext.packed_attention(q, cache, layout, batch, scale)
    if impl == "triton":
        check(q, cache, layout, batch)
        from vllm_kvshrink.kernels import triton_packed  # Triton loads on a GPU's first call

        return triton_packed.packed_attention(q, cache, layout, batch, scale)
    raise ValueError(f"impl={impl!r}; allowed: auto, reference, cpu, triton")
