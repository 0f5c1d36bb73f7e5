"""The C++ CPU kernels' wrappers: :func:`~vllm_kvshrink.kernels.
packed_attention.packed_attention` (``csrc/cpu/packed_attention.cpp``) and
:func:`unpack` (``csrc/cpu/unpack.cpp``: packed pages back to float K/V, what
a tier event reads).  Building and loading the library, and the quantizer's binding
(:func:`quantize`), are :mod:`.cpu_lib`'s, re-exported here; ``python -m
vllm_kvshrink.kernels.cpu_ext build`` builds it.  Where it is not available,
each wrapper falls back to the PyTorch version.
"""

from __future__ import annotations

import sys

import torch

from vllm_kvshrink.kernels import quant
from vllm_kvshrink.kernels.cpu_lib import (  # noqa: F401 - re-exported: callers ask cpu_ext
    available,
    build,
    build_dir,
    build_flags,
    load,
    quantize,
    unavailable_reason,
)
from vllm_kvshrink.kernels.packed_batch import (
    IndexMap,
    PackedBatch,
    check,
    layout_code,
    out_starts,
)

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unpack(pf: quant.PagedForm, pages: torch.Tensor, n: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~vllm_kvshrink.kernels.quant.unpack` (the first ``n`` tokens of
    ``pages`` ``[A, P, region_bytes]`` as float32 ``(keys, values)`` ``[A, n,
    D]``, rotated back) by the C++ kernel, one pass over the codes; the
    PyTorch version where the kernel is not built or ``pages`` is not on the
    CPU."""
    d = pf.head_dim
    if pages.device.type != "cpu" or d < 16 or d > 256 or d & (d - 1) or not load():
        return quant.unpack(pf, pages, n)
    a = pages.shape[0]
    keys = torch.empty(a, n, d)
    values = torch.empty(a, n, d)
    ko, vo, po = pf.offsets()
    torch.ops.kvshrink_cpu.unpack_pages(keys, values, pages.contiguous(), n, pf.k_bits,
                                        pf.v_bits, int(pf.rotate), pf.capacity, ko, vo, po)
    return keys, values


def _check_cpu(q: torch.Tensor, cache: torch.Tensor, batch: PackedBatch) -> None:
    if q.device.type != "cpu" or cache.device.type != "cpu":
        raise ValueError(f"q and cache must be CPU tensors, got {q.device} and {cache.device}")
    if cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {cache.dtype}; allowed: float32, bfloat16, float16")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim D={d}: the CPU kernel needs a power of two in [16, 256]")
    if cache.stride(3) != 1 or cache.stride(2) != cache.shape[3]:
        raise ValueError(f"cache must have each (block, head) region contiguous "
                         f"(strides [..., {cache.shape[3]}, 1]), got {cache.stride()}")
    r, nb, bs = batch.num_reqs, cache.shape[0], cache.shape[2]
    if batch.plain_table.dim() != 2 or batch.plain_table.shape[0] != r:
        raise ValueError(f"batch.plain_table must be [R={r}, max_blocks], got "
                         f"{tuple(batch.plain_table.shape)}")
    if batch.seg_start.shape != (r + 1,):
        raise ValueError(f"batch.seg_start must be [R + 1 = {r + 1}], got "
                         f"{tuple(batch.seg_start.shape)}")
    s = batch.seg_block.numel()
    if batch.seg_form.numel() != s or batch.seg_n.numel() != s:
        raise ValueError("batch.seg_block, seg_form and seg_n must have one entry per segment")
    if r and (int(batch.seg_start[0]) != 0 or int(batch.seg_start[-1]) != s
              or bool((batch.seg_start[1:] < batch.seg_start[:-1]).any())):
        raise ValueError(f"batch.seg_start must rise from 0 to the {s} segments")
    if s and (int(batch.seg_form.min()) < 0 or int(batch.seg_form.max()) >= len(batch.forms)):
        raise ValueError(f"batch.seg_form names a form outside batch.forms "
                         f"({len(batch.forms)} forms)")
    if r:
        if bool((batch.q_len < 1).any()) or bool((batch.q_start < 0).any()):
            raise ValueError("batch.q_len must be >= 1 and batch.q_start >= 0")
        if int((batch.q_start + batch.q_len).max()) > q.shape[0]:
            raise ValueError(f"batch.q_start + q_len reaches past the {q.shape[0]} rows of q")
        need = (batch.plain_len + bs - 1) // bs
        if int(need.max()) > batch.plain_table.shape[1]:
            raise ValueError("batch.plain_table has fewer blocks than a plain_len needs")
        used = torch.arange(batch.plain_table.shape[1])[None, :] < need[:, None]
        blocks = batch.plain_table[used]
        if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= nb):
            raise ValueError(f"batch.plain_table names a block outside the cache's {nb}")


def _prepared(q: torch.Tensor, cache: torch.Tensor, layout: str, batch: PackedBatch):
    """The batch's index tensors for the kernel, checked and laid out once per
    step and cache geometry (a step's batch is the same for every layer)."""
    key = (tuple(q.shape), tuple(cache.shape), cache.dtype, layout)
    prep = batch.prepared.get(key)
    if prep is None:
        check(q, cache, layout, batch)
        _check_cpu(q, cache, batch)
        if not load():
            raise RuntimeError(
                f"the kvshrink CPU kernel is not available: {unavailable_reason()}")
        i64 = lambda t: t.to(torch.int64).contiguous()  # noqa: E731
        maps = ((layout.key_index.contiguous(), layout.value_index.contiguous())
                if isinstance(layout, IndexMap) else (_NO_MAP, _NO_MAP))
        prep = batch.prepared[key] = (
            layout_code(layout), *maps, i64(batch.q_start), i64(batch.q_len), i64(batch.plain_len),
            batch.plain_table.to(torch.int32).contiguous(), i64(batch.seg_start),
            i64(batch.seg_block), i64(batch.seg_form), i64(batch.seg_n),
            batch.form_table().contiguous(), i64(out_starts(batch)),
            int(batch.q_len.sum()) if batch.num_reqs else 0)
    return prep


_NO_MAP = torch.zeros(0, dtype=torch.int32)


def _queries(q: torch.Tensor) -> torch.Tensor:
    """``q`` as the kernel reads it: contiguous, in a float dtype it knows."""
    return (q if q.dtype in CACHE_DTYPES else q.float()).contiguous()


def packed_attention(q: torch.Tensor, cache: torch.Tensor, layout: str, batch: PackedBatch,
                     scale: float) -> torch.Tensor:
    """The C++ kernel: same arguments and result as :func:`~vllm_kvshrink.
    kernels.packed_reference.reference`."""
    code, kmap, vmap, q_start, q_len, plain_len, table, seg_start, seg_block, seg_form, \
        seg_n, forms, starts, total = _prepared(q, cache, layout, batch)
    hq, d = q.shape[1:]
    out = torch.empty(total, hq, d, dtype=torch.float32)
    if total:
        torch.ops.kvshrink_cpu.packed_attention(
            out, _queries(q), cache, code, kmap, vmap, q_start, q_len, plain_len, table,
            seg_start, seg_block, seg_form, seg_n, forms, starts, float(scale))
    return out


def packed_attention_into(q: torch.Tensor, cache: torch.Tensor, layout: str,
                          batch: PackedBatch, scale: float, output: torch.Tensor) -> None:
    """The C++ kernel writing each packed request's rows straight into
    ``output`` ``[T, Hq, D]`` (the step's attention output, any float dtype:
    row ``q_start + i`` for query ``i``), rows of other requests untouched."""
    code, kmap, vmap, q_start, q_len, plain_len, table, seg_start, seg_block, seg_form, \
        seg_n, forms, _, total = _prepared(q, cache, layout, batch)
    if output.shape != q.shape or not output.is_contiguous() \
            or output.dtype not in CACHE_DTYPES:
        raise ValueError(f"output must be a contiguous float tensor of q's shape "
                         f"{tuple(q.shape)}, got {output.dtype} {tuple(output.shape)}")
    if total:
        torch.ops.kvshrink_cpu.packed_attention(
            output, _queries(q), cache, code, kmap, vmap, q_start, q_len, plain_len,
            table, seg_start, seg_block, seg_form, seg_n, forms, q_start, float(scale))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["build"]:
        print("usage: python -m vllm_kvshrink.kernels.cpu_ext build [-v]", file=sys.stderr)
        return 2
    path = build(verbose="-v" in args[1:])
    print(f"built the kvshrink CPU kernel: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
