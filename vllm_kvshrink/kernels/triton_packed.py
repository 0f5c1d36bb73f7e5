"""Triton twin of the C++ packed-attention kernel (:mod:`.cpu_ext`), for GPUs
(and, under ``TRITON_INTERPRET=1``, CPU tensors in the interpreter).

One program per (request, KV head, tile of queries): its rows are the tile's
queries times the G query heads of that KV head.  It walks the request's
packed segments (codes unpacked with shifts and masks, bf16 parameters read
as raw bits, so every backend dequantizes alike) and then its plain region
through the block table, with one online softmax in fp32.  Same semantics as
:func:`~vllm_kvshrink.kernels.packed_attention.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvshrink.kernels._launch import launchable, targets_gpu, use_triton
from vllm_kvshrink.kernels.packed_attention import (
    LAYOUT_CODES,
    PackedBatch,
    check,
    finish,
    out_starts,
    rotated_query,
)

_CACHE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def packed_attention_kernel(
    q_ptr, qr_ptr, out_ptr, outr_ptr,
    cache_ptr, cache_u8, cache_i16,  # one storage: cache dtype, bytes, 16-bit words
    q_start, q_len, plain_len, table, table_w,
    seg_start, seg_block, seg_form, seg_n, forms, out_start,
    s_b, s_h, esize, block_size, scale, n_kv_heads,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    K_COLS: tl.constexpr,  # keys transposed in the plain blocks (cpu_k_transposed)
    CACHE_KIND: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16
    HAS_ROT: tl.constexpr,
    TQ: tl.constexpr,  # queries per program
    BLOCK_M: tl.constexpr,  # rows: TQ * G, padded to a power of two
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid // n_kv_heads
    h = (pid % n_kv_heads).to(tl.int64)
    ql = tl.load(q_len + r)
    q0 = tl.program_id(1) * TQ
    if q0 >= ql:
        return
    pl = tl.load(plain_len + r)
    m = tl.arange(0, BLOCK_M)
    qi = q0 + m // G
    head = h * G + m % G
    row_ok = (m < TQ * G) & (qi < ql)
    d = tl.arange(0, D)
    q_rows = (tl.load(q_start + r) + qi).to(tl.int64)
    q_offs = (q_rows * HQ + head)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0).to(tl.float32) * scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if HAS_ROT:
        qr = tl.load(qr_ptr + q_offs, mask=row_ok[:, None], other=0.0).to(tl.float32) * scale
        acc_r = tl.zeros([BLOCK_M, D], tl.float32)
    n_idx = tl.arange(0, BLOCK_N)

    # packed segments: every query sees all of their tokens
    s_lo = tl.load(seg_start + r)
    s_hi = tl.load(seg_start + r + 1)
    for si in range(s_lo, s_hi):
        blk = tl.load(seg_block + si).to(tl.int64)
        f = tl.load(seg_form + si) * 7
        n = tl.load(seg_n + si)
        k_bits = tl.load(forms + f).to(tl.int32)
        v_bits = tl.load(forms + f + 1).to(tl.int32)
        rot = tl.load(forms + f + 2)
        k_off = tl.load(forms + f + 4)
        v_off = tl.load(forms + f + 5)
        p_off = tl.load(forms + f + 6)
        base = (blk * s_b + h * s_h) * esize  # the region's first byte
        k_byte = (d * k_bits) // 8
        k_shift = (d * k_bits) % 8
        v_byte = (d * v_bits) // 8
        v_shift = (d * v_bits) % 8
        k_mask = (1 << k_bits) - 1
        v_mask = (1 << v_bits) - 1
        for t0 in range(0, n, BLOCK_N):
            t = t0 + n_idx
            t_ok = t < n
            t64 = t.to(tl.int64)
            kc = tl.load(cache_u8 + base + k_off + t64[:, None] * (D * k_bits // 8)
                         + k_byte[None, :], mask=t_ok[:, None], other=0)
            vc = tl.load(cache_u8 + base + v_off + t64[:, None] * (D * v_bits // 8)
                         + v_byte[None, :], mask=t_ok[:, None], other=0)
            par = (base + p_off) // 2 + t64 * 4  # 4 bf16 per token
            ks = tl.load(cache_i16 + par, mask=t_ok, other=0).to(tl.int32)
            kz = tl.load(cache_i16 + par + 1, mask=t_ok, other=0).to(tl.int32)
            vs = tl.load(cache_i16 + par + 2, mask=t_ok, other=0).to(tl.int32)
            vz = tl.load(cache_i16 + par + 3, mask=t_ok, other=0).to(tl.int32)
            ks = ((ks & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            kz = ((kz & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            vs = ((vs & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            vz = ((vz & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            kq = ((kc.to(tl.int32) >> k_shift[None, :]) & k_mask).to(tl.float32)
            vq = ((vc.to(tl.int32) >> v_shift[None, :]) & v_mask).to(tl.float32)
            k = kq * ks[:, None] + kz[:, None]
            v = vq * vs[:, None] + vz[:, None]
            if HAS_ROT:
                if rot != 0:
                    s = tl.dot(qr, tl.trans(k), input_precision=PRECISION)
                else:
                    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            else:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s = tl.where(row_ok[:, None] & t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = tl.dot(p, v, input_precision=PRECISION)
            if HAS_ROT:
                if rot != 0:
                    acc = acc * alpha[:, None]
                    acc_r = acc_r * alpha[:, None] + pv
                else:
                    acc = acc * alpha[:, None] + pv
                    acc_r = acc_r * alpha[:, None]
            else:
                acc = acc * alpha[:, None] + pv
            m_i = m_new

    # plain region, causal: query i sees positions <= pl - ql + i
    limit = pl - ql + qi  # per row
    n_vis = pl - ql + tl.minimum(q0 + TQ, ql)
    row_table = table + r.to(tl.int64) * table_w
    for p0 in range(0, n_vis, BLOCK_N):
        pos = p0 + n_idx
        p_ok = pos < n_vis
        blk = tl.load(row_table + pos // block_size, mask=p_ok, other=0).to(tl.int64)
        slot = (pos % block_size).to(tl.int64)
        reg = blk * s_b + h * s_h
        if K_COLS:
            k_offs = reg[:, None] + d[None, :] * block_size + slot[:, None]
        else:
            k_offs = (reg + slot * D)[:, None] + d[None, :]
        v_offs = (reg + block_size * D + slot * D)[:, None] + d[None, :]
        if CACHE_KIND == 1:
            k = tl.load(cache_i16 + k_offs, mask=p_ok[:, None], other=0).to(tl.int32)
            v = tl.load(cache_i16 + v_offs, mask=p_ok[:, None], other=0).to(tl.int32)
            k = ((k & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            v = ((v & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        else:
            k = tl.load(cache_ptr + k_offs, mask=p_ok[:, None], other=0.0).to(tl.float32)
            v = tl.load(cache_ptr + v_offs, mask=p_ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        ok = row_ok[:, None] & p_ok[None, :] & (pos[None, :] <= limit[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        if HAS_ROT:
            acc_r = acc_r * alpha[:, None]
        m_i = m_new

    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    o_rows = (tl.load(out_start + r) + qi).to(tl.int64)
    o_offs = (o_rows * HQ + head)[:, None] * D + d[None, :]
    tl.store(out_ptr + o_offs, acc * inv[:, None], mask=row_ok[:, None])
    if HAS_ROT:
        tl.store(outr_ptr + o_offs, acc_r * inv[:, None], mask=row_ok[:, None])


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def packed_attention(q: torch.Tensor, cache: torch.Tensor, layout: str, batch: PackedBatch,
                     scale: float, precision: str = "ieee") -> torch.Tensor:
    """The Triton kernel: same arguments and result as :func:`~vllm_kvshrink.
    kernels.packed_attention.reference`.  ``precision`` is ``tl.dot``'s
    ``input_precision`` (``"ieee"``: fp32 products; ``"tf32"`` is faster on
    GPUs and less exact)."""
    check(q, cache, layout, batch)
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
    launchable(packed_attention_kernel)[grid](
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
