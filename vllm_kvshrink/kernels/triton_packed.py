"""Triton twin of the C++ packed-attention kernel (:mod:`.cpu_ext`), for GPUs
(and, under ``TRITON_INTERPRET=1``, CPU tensors in the interpreter): the host
side (checks, allocation, grid) of
:func:`~vllm_kvshrink.kernels.triton_kernels.packed_attention_kernel`.

One program per (request, KV head, tile of queries): its rows are the tile's
queries times the G query heads of that KV head.  It walks the request's
packed segments (codes unpacked with shifts and masks, bf16 parameters read
as raw bits, so every backend dequantizes alike) and then its plain region
through the block table, with one online softmax in fp32.  Same semantics as
:func:`~vllm_kvshrink.kernels.packed_reference.reference`.
"""

from __future__ import annotations

import torch
import triton

from vllm_kvshrink.kernels import triton_kernels as tk
from vllm_kvshrink.kernels._launch import launchable, targets_gpu, use_triton
from vllm_kvshrink.kernels.packed_batch import (
    LAYOUT_CODES,
    PackedBatch,
    check,
    finish,
    out_starts,
    rotated_query,
)

_CACHE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def packed_attention(q: torch.Tensor, cache: torch.Tensor, layout: str, batch: PackedBatch,
                     scale: float, precision: str = "ieee") -> torch.Tensor:
    """The Triton kernel: same arguments and result as :func:`~vllm_kvshrink.
    kernels.packed_reference.reference`.  ``precision`` is ``tl.dot``'s
    ``input_precision`` (``"ieee"``: fp32 products; ``"tf32"`` is faster on
    GPUs and less exact)."""
    check(q, cache, layout, batch)
    if layout not in LAYOUT_CODES:
        raise ValueError(f"the Triton packed-attention kernel reads the strided layouts "
                         f"({', '.join(LAYOUT_CODES)}), not {type(layout).__name__}")
    if not use_triton(q):
        raise ValueError("the Triton packed-attention kernel needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for CPU tensors)")
    if cache.device != q.device:
        raise ValueError(f"q and cache must be on one device, got {q.device} and {cache.device}")
    if cache.dtype not in _CACHE_KIND:
        raise ValueError(f"cache dtype {cache.dtype}; allowed: float32, bfloat16, float16")
    if precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"precision={precision!r}; allowed: ieee, tf32, tf32x3")
    hq, d = q.shape[1:]
    nb, hkv, bs, _ = cache.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim D={d}: the Triton kernel needs a power of two >= 16")
    if cache.stride(3) != 1 or cache.stride(2) != 2 * d:
        raise ValueError(f"cache must have each (block, head) region contiguous "
                         f"(strides [..., {2 * d}, 1]), got {cache.stride()}")
    total = int(batch.q_len.sum()) if batch.num_reqs else 0
    dev = q.device
    out = torch.empty(total, hq, d, dtype=torch.float32, device=dev)
    if total == 0:
        return out
    g = hq // hkv
    rot = batch.any_rotated()
    qf = q.float().contiguous()
    q_rot = rotated_query(qf, batch).contiguous() if rot else qf
    out_rot = torch.empty_like(out) if rot else out
    max_ql = int(batch.q_len.max())
    block_m = max(16, _pow2(min(g * max_ql, max(64, g))))
    tq = block_m // g
    gpu = targets_gpu(q)
    block_n = 64 if gpu and d <= 128 else 32
    i64 = lambda t: t.to(device=dev, dtype=torch.int64).contiguous()  # noqa: E731
    table = batch.plain_table.to(device=dev, dtype=torch.int32).contiguous()
    grid = (batch.num_reqs * hkv, triton.cdiv(max_ql, tq))
    launchable(tk.packed_attention_kernel)[grid](
        qf, q_rot, out, out_rot,
        cache, cache.view(torch.uint8), cache.view(torch.int16),
        i64(batch.q_start), i64(batch.q_len), i64(batch.plain_len), table, table.shape[1],
        i64(batch.seg_start), i64(batch.seg_block), i64(batch.seg_form), i64(batch.seg_n),
        i64(batch.form_table()), i64(out_starts(batch)),
        cache.stride(0), cache.stride(1), cache.element_size(), bs, float(scale), hkv,
        HQ=hq, G=g, D=d, K_COLS=LAYOUT_CODES[layout] == 0,
        CACHE_KIND=_CACHE_KIND[cache.dtype], HAS_ROT=rot, TQ=tq, BLOCK_M=block_m,
        BLOCK_N=block_n, PRECISION=precision)
    return finish(out, out_rot, batch)
