"""``@triton.jit`` kernels of the lab ops only (self-contained, as
:mod:`vllm_kvshrink.kernels.triton_kernels`): compaction, merging and window
scoring; checks, allocation and grids live in :mod:`.ops`.

Index arithmetic that can exceed 2**31 elements (block id times block stride,
layer times layer stride) is done in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------
# compaction
# --------------------------------------------------------------------------
@triton.jit
def compact_kernel(
    src_k, src_v, dst_k, dst_v,
    src_table, src_index, dst_table,
    n_keep, n_heads,
    sk_l, sk_b, sk_h, sk_t, sk_d,  # source K strides: layer, block, head, token, dim
    sv_l, sv_b, sv_h, sv_t, sv_d,  # source V
    dk_l, dk_b, dk_h, dk_t, dk_d,  # destination K
    dv_l, dv_b, dv_h, dv_t, dv_d,  # destination V
    si_l, si_h, si_k,  # src_index [L, H, K]
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SRC_PAGED: tl.constexpr,
    DST_PAGED: tl.constexpr,
):
    """Copy kept tokens ``i`` of (layer, head) ``program_id(0)``.

    A paged side addresses token ``i`` through its block table (the source
    through ``src_index`` first); an unpaged side is a staging buffer indexed
    by ``i`` directly (its block stride is unused).  Programs along axis 1
    take interleaved chunks; with one program there, chunks go in ascending
    order and every chunk's loads finish (barrier) before its stores, which
    is what makes in-place compaction safe (see ``ops.compact_kv``).
    """
    pid = tl.program_id(0)
    layer = (pid // n_heads).to(tl.int64)
    head = (pid % n_heads).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    src_k_base = src_k + layer * sk_l + head * sk_h
    src_v_base = src_v + layer * sv_l + head * sv_h
    dst_k_base = dst_k + layer * dk_l + head * dk_h
    dst_v_base = dst_v + layer * dv_l + head * dv_h
    for start in range(tl.program_id(1) * BLOCK_T, n_keep, tl.num_programs(1) * BLOCK_T):
        i = start + tl.arange(0, BLOCK_T)
        mask_t = i < n_keep
        mask = mask_t[:, None] & mask_d[None, :]
        if SRC_PAGED:
            s = tl.load(src_index + layer * si_l + head * si_h + i * si_k, mask=mask_t, other=0)
            s_blk = tl.load(src_table + s // BLOCK_SIZE, mask=mask_t, other=0).to(tl.int64)
            s_off = (s % BLOCK_SIZE).to(tl.int64)
            src_k_tok = s_blk * sk_b + s_off * sk_t
            src_v_tok = s_blk * sv_b + s_off * sv_t
        else:
            src_k_tok = i.to(tl.int64) * sk_t
            src_v_tok = i.to(tl.int64) * sv_t
        k = tl.load(src_k_base + src_k_tok[:, None] + d[None, :] * sk_d, mask=mask)
        v = tl.load(src_v_base + src_v_tok[:, None] + d[None, :] * sv_d, mask=mask)
        if DST_PAGED:
            d_blk = tl.load(dst_table + i // BLOCK_SIZE, mask=mask_t, other=0).to(tl.int64)
            d_off = (i % BLOCK_SIZE).to(tl.int64)
            dst_k_tok = d_blk * dk_b + d_off * dk_t
            dst_v_tok = d_blk * dv_b + d_off * dv_t
        else:
            dst_k_tok = i.to(tl.int64) * dk_t
            dst_v_tok = i.to(tl.int64) * dv_t
        # Another thread of this program may store over a slot this chunk is
        # still reading (in-place compaction): all loads land first.
        tl.debug_barrier()
        tl.store(dst_k_base + dst_k_tok[:, None] + d[None, :] * dk_d, k, mask=mask)
        tl.store(dst_v_base + dst_v_tok[:, None] + d[None, :] * dv_d, v, mask=mask)


# --------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------
@triton.jit
def merge_accumulate_kernel(
    k_ptr, v_ptr, w_ptr, g_ptr,
    acc_k, acc_v, acc_w, acc_n,
    n_tokens, n_groups,
    sk_h, sk_n, sk_d, sv_h, sv_n, sv_d, sw_h, sw_n, sg_h, sg_n,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Atomically add ``w * k``, ``w * v``, ``w`` and 1 of each token into its
    group's fp32 accumulators (``[H * G, D]`` / ``[H * G]``)."""
    head = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < n_tokens
    g = tl.load(g_ptr + head * sg_h + n * sg_n, mask=mask_n, other=-1).to(tl.int64)
    valid = mask_n & (g >= 0) & (g < n_groups)
    w = tl.load(w_ptr + head * sw_h + n * sw_n, mask=valid, other=0.0).to(tl.float32)
    d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + head * sk_h + n[:, None] * sk_n + d[None, :] * sk_d, mask=mask, other=0.0)
    v = tl.load(v_ptr + head * sv_h + n[:, None] * sv_n + d[None, :] * sv_d, mask=mask, other=0.0)
    row = head * n_groups + g
    dst = row[:, None] * HEAD_DIM + d[None, :]
    tl.atomic_add(acc_k + dst, k.to(tl.float32) * w[:, None], mask=mask)
    tl.atomic_add(acc_v + dst, v.to(tl.float32) * w[:, None], mask=mask)
    tl.atomic_add(acc_w + row, w, mask=valid)
    tl.atomic_add(acc_n + row, tl.full([BLOCK_N], 1, tl.int32), mask=valid)


@triton.jit
def merge_finalize_kernel(
    acc_k, acc_v, acc_w, out_k, out_v,
    n_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``out = acc / weight_sum`` (0 where the sum is 0), in the output dtype."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < n_rows
    d = tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (d < HEAD_DIM)[None, :]
    w = tl.load(acc_w + r, mask=mask_r, other=0.0)
    inv = tl.where(w > 0, 1.0 / tl.where(w > 0, w, 1.0), 0.0)
    offs = r[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    k = tl.load(acc_k + offs, mask=mask, other=0.0) * inv[:, None]
    v = tl.load(acc_v + offs, mask=mask, other=0.0) * inv[:, None]
    tl.store(out_k + offs, k.to(out_k.dtype.element_ty), mask=mask)
    tl.store(out_v + offs, v.to(out_v.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------
@triton.jit
def window_stats_kernel(
    q_ptr, k_ptr, table_ptr, m_ptr, l_ptr,
    seq_len, n_window, sm_scale,
    sq_w, sq_h, sq_d, sk_b, sk_h, sk_t, sk_d,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 1: running max ``m`` and sum of ``exp(s - m)`` of each window row
    (query head ``program_id(0)``), over the keys of the paged cache."""
    hq = tl.program_id(0)
    hk = (hq // GROUP).to(tl.int64)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_w = w < n_window
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    q = tl.load(q_ptr + w[:, None] * sq_w + hq * sq_h + d[None, :] * sq_d,
                mask=mask_w[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = seq_len - n_window + w
    m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_W], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        mask_n = n < seq_len
        blk = tl.load(table_ptr + n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        off = (n % BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_ptr + blk[:, None] * sk_b + hk * sk_h + off[:, None] * sk_t
                    + d[None, :] * sk_d, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= qpos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    tl.store(m_ptr + hq * n_window + w, m_i, mask=mask_w)
    tl.store(l_ptr + hq * n_window + w, l_i, mask=mask_w)


@triton.jit
def window_scores_kernel(
    q_ptr, k_ptr, table_ptr, m_ptr, l_ptr, out_ptr,
    seq_len, n_window, sm_scale,
    sq_w, sq_h, sq_d, sk_b, sk_h, sk_t, sk_d,
    GROUP: tl.constexpr,
    HEADS_PER_OUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 2: for ``BLOCK_N`` keys, the normalised probabilities of every
    window row reduced over the window (sum or max), then averaged over the
    ``HEADS_PER_OUT`` query heads of output row ``program_id(0)``."""
    o = tl.program_id(0)
    hq0 = o * HEADS_PER_OUT
    hk = (hq0 // GROUP).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < seq_len
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    blk = tl.load(table_ptr + n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    off = (n % BLOCK_SIZE).to(tl.int64)
    k = tl.load(k_ptr + blk[:, None] * sk_b + hk * sk_h + off[:, None] * sk_t
                + d[None, :] * sk_d, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    for hh in range(HEADS_PER_OUT):
        hq = hq0 + hh
        red = tl.zeros([BLOCK_N], tl.float32)
        for w_start in range(0, n_window, BLOCK_W):
            w = w_start + tl.arange(0, BLOCK_W)
            mask_w = w < n_window
            q = tl.load(q_ptr + w[:, None] * sq_w + hq * sq_h + d[None, :] * sq_d,
                        mask=mask_w[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            m = tl.load(m_ptr + hq * n_window + w, mask=mask_w, other=float("inf"))
            lsum = tl.load(l_ptr + hq * n_window + w, mask=mask_w, other=1.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
            valid = mask_w[:, None] & mask_n[None, :]
            if CAUSAL:
                valid = valid & (n[None, :] <= (seq_len - n_window + w)[:, None])
            p = tl.where(valid, tl.exp(s - m[:, None]) / lsum[:, None], 0.0)
            if REDUCE_MAX:
                red = tl.maximum(red, tl.max(p, axis=0))
            else:
                red = red + tl.sum(p, axis=0)
        total = total + red
    tl.store(out_ptr + o * seq_len + n, total / HEADS_PER_OUT, mask=mask_n)


@triton.jit
def pool_scores_kernel(
    x_ptr, out_ptr, n,
    KERNEL: tl.constexpr,
    MAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pooling of per-token scores over ``KERNEL`` (odd) neighbours, centred,
    row ``program_id(0)`` of ``x [rows, n]``: max, or the mean of the taps
    inside the row (padding not counted)."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = i < n
    HALF: tl.constexpr = KERNEL // 2
    if MAX:
        acc = tl.full([BLOCK_N], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
    count = tl.zeros([BLOCK_N], tl.float32)
    for t in tl.static_range(KERNEL):
        j = i + (t - HALF)
        ok = mask & (j >= 0) & (j < n)
        if MAX:
            acc = tl.maximum(acc, tl.load(x_ptr + row * n + j, mask=ok, other=float("-inf")))
        else:
            acc = acc + tl.load(x_ptr + row * n + j, mask=ok, other=0.0)
            count = count + ok.to(tl.float32)
    if not MAX:
        acc = acc / tl.maximum(count, 1.0)
    tl.store(out_ptr + row * n + i, acc, mask=mask)
