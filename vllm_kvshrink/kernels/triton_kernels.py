"""``@triton.jit`` kernels of the engine only (self-contained: no jit helpers,
so each can be re-wrapped for the interpreter at launch): the quantizer
(:mod:`.quant`, launched by :mod:`.triton_quant`) and packed attention
(launched by :mod:`.triton_packed`).  Checks, allocation and grids live in
those host modules.

Index arithmetic that can exceed 2**31 elements (block id times block stride,
layer times layer stride) is done in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Adding then subtracting 1.5 * 2**23 rounds an fp32 |v| < 2**22 to the nearest
# integer, ties to even (IEEE round-to-nearest), exactly like torch.round.
_ROUND_MAGIC = tl.constexpr(12582912.0)


# --------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------
@triton.jit
def quantize_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr,
    n_rows, rows_per_a,
    sx_a, sx_r, sx_c,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    N_GROUPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PARAM_BF16: tl.constexpr,
):
    """One group of ``BLOCK_R`` rows of ``x [A, R, C]`` per program.

    The group is loaded as a flat ``[BLOCK_R, BLOCK_B * codes per byte]``
    tile (contiguous, so the loads vectorise) and its codes are reshaped to
    ``[BLOCK_R, bytes, codes per byte]``, so that packing is a shift and a sum
    along the last axis.  Rounding as in ``reference.quantize_ref`` (IEEE
    division, ties to even, clamp).  bf16 parameters are rounded to
    nearest-even with integer ops, which gives the same bits on every backend
    (Triton's CPU interpreter truncates fp32 to bf16 in ``.to``).
    """
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    BYTES: tl.constexpr = GROUP_SIZE // PER
    # One axis, groups fastest: neighbouring programs share the rows' cache
    # lines (and the grid has no 65535 limit on the row blocks).
    pid = tl.program_id(0)
    g = pid % N_GROUPS
    rows = (pid // N_GROUPS) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    a = (rows // rows_per_a).to(tl.int64)
    r = (rows % rows_per_a).to(tl.int64)
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, PER)
    e = tl.arange(0, BLOCK_B * PER)  # element of the group
    col = g * GROUP_SIZE + e
    mask = mask_r[:, None] & (e < GROUP_SIZE)[None, :]
    offs = (a * sx_a + r * sx_r)[:, None] + col[None, :].to(tl.int64) * sx_c
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(mask, x, float("inf")), axis=1)
    mx = tl.max(tl.where(mask, x, float("-inf")), axis=1)
    mn = tl.where(mask_r, mn, 0.0)  # rows past the end: finite, never stored
    mx = tl.where(mask_r, mx, 0.0)
    p_ty = scale_ptr.dtype.element_ty
    scale = tl.math.div_rn(mx - mn, QMAX * 1.0)
    zero = mn
    if PARAM_BF16:
        zb = zero.to(tl.uint32, bitcast=True)
        zb = (zb + 0x7FFF + ((zb >> 16) & 1)) & 0xFFFF0000
        zero = zb.to(tl.float32, bitcast=True)
        sb = scale.to(tl.uint32, bitcast=True)
        sb = (sb + 0x7FFF + ((sb >> 16) & 1)) & 0xFFFF0000
        scale = sb.to(tl.float32, bitcast=True)
    zero = zero.to(p_ty)
    # exact in p_ty; compared and replaced in fp32 (no p_ty constant needed)
    scale = scale.to(p_ty).to(tl.float32)
    scale = tl.where(scale > 0, scale, 1.0).to(p_ty)
    v = tl.math.div_rn(x - zero.to(tl.float32)[:, None], scale.to(tl.float32)[:, None])
    q = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32)
    q = tl.reshape(q, (BLOCK_R, BLOCK_B, PER))
    byte = tl.sum(q << (j * BITS)[None, None, :], axis=2)  # [BLOCK_R, BLOCK_B]
    n_bytes_row: tl.constexpr = N_GROUPS * BYTES
    p_offs = rows.to(tl.int64)[:, None] * n_bytes_row + g * BYTES + b[None, :]
    tl.store(packed_ptr + p_offs, byte.to(tl.uint8), mask=mask_r[:, None] & (b < BYTES)[None, :])
    s_offs = rows.to(tl.int64) * N_GROUPS + g
    tl.store(scale_ptr + s_offs, scale, mask=mask_r)
    tl.store(zero_ptr + s_offs, zero, mask=mask_r)


@triton.jit
def dequantize_kernel(
    packed_ptr, scale_ptr, zero_ptr, out_ptr,
    n_rows, rows_per_a,
    so_a, so_r, so_c,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    N_GROUPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Inverse of :func:`quantize_kernel`: ``out = q * scale + zero``."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    BYTES: tl.constexpr = GROUP_SIZE // PER
    # One axis, groups fastest: neighbouring programs share the rows' cache
    # lines (and the grid has no 65535 limit on the row blocks).
    pid = tl.program_id(0)
    g = pid % N_GROUPS
    rows = (pid // N_GROUPS) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, PER)
    n_bytes_row: tl.constexpr = N_GROUPS * BYTES
    p_offs = rows.to(tl.int64)[:, None] * n_bytes_row + g * BYTES + b[None, :]
    byte = tl.load(packed_ptr + p_offs, mask=mask_r[:, None] & (b < BYTES)[None, :], other=0)
    q = (byte.to(tl.int32)[:, :, None] >> (j * BITS)[None, None, :]) & QMAX
    s_offs = rows.to(tl.int64) * N_GROUPS + g
    scale = tl.load(scale_ptr + s_offs, mask=mask_r, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + s_offs, mask=mask_r, other=0.0).to(tl.float32)
    x = q.to(tl.float32) * scale[:, None, None] + zero[:, None, None]
    x = tl.reshape(x, (BLOCK_R, BLOCK_B * PER))  # flat, so the stores vectorise
    a = (rows // rows_per_a).to(tl.int64)
    r = (rows % rows_per_a).to(tl.int64)
    e = tl.arange(0, BLOCK_B * PER)
    col = g * GROUP_SIZE + e
    offs = (a * so_a + r * so_r)[:, None] + col[None, :].to(tl.int64) * so_c
    mask = mask_r[:, None] & (e < GROUP_SIZE)[None, :]
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# packed attention
# --------------------------------------------------------------------------
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
