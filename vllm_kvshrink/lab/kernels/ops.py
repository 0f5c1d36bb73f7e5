"""Kernels the engine does not call: compaction, merging and window scoring
of paged KV caches, and KIVI's quantization of keys and values.

Host wrappers (argument checks, allocation, grids) registered as
``kvshrink::`` torch custom ops with fake implementations; the
``@triton.jit`` kernels are in :mod:`.triton_kernels`, the PyTorch twins in
:mod:`.reference`, CUDA versions of compaction and quantization in
:mod:`.cuda_ext`.  Each op runs its Triton kernel on CUDA tensors and on CPU
tensors while Triton interprets (``TRITON_INTERPRET=1``); otherwise, on the
CPU, it runs the reference.  The engine's worker moves kept tokens with
:mod:`vllm_kvshrink.serving.worker.kv_layout` and scores with the methods'
PyTorch code; these kernels are the GPU versions of those steps, measured by
``benchmarks/kernels`` and not wired into the serving path.
"""

from __future__ import annotations

import torch
import triton

from vllm_kvshrink.kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_shape,
    check_tensor,
)
from vllm_kvshrink.kernels._launch import interpreting, launchable, targets_gpu, use_triton
from vllm_kvshrink.kernels.layouts import LAYOUTS, cache_dims, kv_views, stack_layers
from vllm_kvshrink.kernels.quant import Quantized, quantize
from vllm_kvshrink.lab.kernels import reference as ref
from vllm_kvshrink.lab.kernels import triton_kernels as tk

CACHE_DTYPES = FLOAT_DTYPES + (
    torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2,
)
# Compaction copies raw elements: an integer view of the same width keeps
# every bit (NaN payloads, fp8) and works in the interpreter.
_RAW = {1: torch.int8, 2: torch.int16, 4: torch.int32}
REDUCTIONS = ("sum", "max")
POOL_MODES = ("avg", "max")


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _check_values(name: str, t: torch.Tensor, upper: int, what: str) -> None:
    """Range check of index values; only for CPU tensors (on CUDA it would
    synchronise the stream, and out-of-range ids are the caller's bug, as in
    vLLM's own cache ops)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} holds values in [{lo}, {hi}]; allowed: [0, {upper}) ({what})")


# ==========================================================================
# compaction
# ==========================================================================
def _check_in_place_order(src_table, src_index, dst_table, bs) -> None:
    """The precondition of ``staged=False`` when destination and source blocks
    overlap: ``dst_table`` (the part used) is a prefix of ``src_table`` and
    each ``src_index[l, h]`` is strictly increasing.  CPU tensors only, like
    the range checks."""
    n_keep = src_index.shape[2]
    if src_table.device.type != "cpu" or n_keep == 0:
        return
    used = dst_table[: triton.cdiv(n_keep, bs)].tolist()
    if not set(used) & set(src_table.tolist()):
        return  # disjoint: any order is safe
    if used != src_table[: len(used)].tolist():
        raise ValueError(
            f"staged=False with dst_table sharing blocks with src_table needs dst_table to be "
            f"a prefix of src_table (compaction in place); got dst_table[:{len(used)}]={used} "
            f"and src_table[:{len(used)}]={src_table[: len(used)].tolist()}; use staged=True "
            f"for any other overlap")
    if n_keep > 1:
        steps = src_index[..., 1:].long() - src_index[..., :-1].long()
        if (steps <= 0).any():
            l, h, i = (int(v) for v in (steps <= 0).nonzero()[0])
            raise ValueError(
                f"staged=False in place needs each src_index[l, h] strictly increasing; "
                f"src_index[{l}, {h}, {i}:{i + 2}]={src_index[l, h, i:i + 2].tolist()}; sort "
                f"the kept positions or use staged=True")


def _check_compact(cache, src_table, src_index, dst_table, layout,
                   values: bool = True, staged: bool = True) -> tuple[int, ...]:
    check_choice("layout", layout, LAYOUTS)
    check_tensor("cache", cache, dtypes=CACHE_DTYPES)
    dims = cache_dims(cache, layout)
    n_layers, n_blocks, n_heads, bs, _ = dims
    dev = cache.device
    check_tensor("src_table", src_table, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_tensor("src_index", src_index, ndim=3, dtypes=INDEX_DTYPES, device=dev)
    check_tensor("dst_table", dst_table, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    if tuple(src_index.shape[:2]) != (n_layers, n_heads):
        raise ValueError(
            f"src_index must be [L={n_layers}, H={n_heads}, K], got shape "
            f"{tuple(src_index.shape)}"
        )
    n_keep = src_index.shape[2]
    if dst_table.numel() * bs < n_keep:
        raise ValueError(
            f"dst_table has {dst_table.numel()} blocks of {bs} tokens, too few for "
            f"the {n_keep} kept tokens in src_index"
        )
    if values:
        _check_values("src_index", src_index, src_table.numel() * bs,
                      "positions in src_table's row")
        _check_values("src_table", src_table, n_blocks, "block ids of cache")
        _check_values("dst_table", dst_table, n_blocks, "block ids of cache")
        if not staged:
            _check_in_place_order(src_table, src_index, dst_table, bs)
    return dims


def _compact_triton(cache, src_table, src_index, dst_table, layout, staged) -> None:
    raw = cache.view(_RAW[cache.element_size()])
    k, v = kv_views(raw, layout)
    n_layers, _, n_heads, bs, d = k.shape
    n_keep = src_index.shape[2]
    if n_keep == 0:
        return
    block_d = _pow2(d)
    block_t = min(_pow2(n_keep), max(1, 8192 // block_d))
    meta = dict(BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t)
    kernel = launchable(tk.compact_kernel)
    common = (src_table, src_index, dst_table, n_keep, n_heads)
    if not staged:
        kernel[(n_layers * n_heads, 1)](
            k, v, k, v, *common, *k.stride(), *v.stride(), *k.stride(), *v.stride(),
            *src_index.stride(), SRC_PAGED=True, DST_PAGED=True, **meta)
        return
    tmp = torch.empty(n_layers, n_heads, n_keep, 2, d, dtype=raw.dtype, device=raw.device)
    s_l, s_h, s_t, s_kv, s_d = tmp.stride()
    tmp_strides = (s_l, 0, s_h, s_t, s_d)  # the block stride is unused
    tmp_v = tmp[:, :, :, 1]
    grid = (n_layers * n_heads, triton.cdiv(n_keep, block_t))
    kernel[grid](k, v, tmp, tmp_v, *common, *k.stride(), *v.stride(), *tmp_strides,
                 *tmp_strides, *src_index.stride(), SRC_PAGED=True, DST_PAGED=False, **meta)
    kernel[grid](tmp, tmp_v, k, v, *common, *tmp_strides, *tmp_strides, *k.stride(),
                 *v.stride(), *src_index.stride(), SRC_PAGED=False, DST_PAGED=True, **meta)


@torch.library.custom_op("kvshrink::compact_kv", mutates_args=("cache",))
def _compact_kv_op(
    cache: torch.Tensor,
    src_table: torch.Tensor,
    src_index: torch.Tensor,
    dst_table: torch.Tensor,
    layout: str,
    staged: bool,
) -> None:
    _check_compact(cache, src_table, src_index, dst_table, layout, staged=staged)
    if use_triton(cache):
        _compact_triton(cache, src_table, src_index, dst_table, layout, staged)
    else:
        ref.compact_kv_ref(cache, layout, src_table, src_index, dst_table)


@_compact_kv_op.register_fake
def _(cache, src_table, src_index, dst_table, layout, staged) -> None:
    _check_compact(cache, src_table, src_index, dst_table, layout, values=False)


def compact_kv(
    cache: torch.Tensor | list[torch.Tensor],
    src_table: torch.Tensor,
    src_index: torch.Tensor,
    dst_table: torch.Tensor,
    layout: str,
    staged: bool = False,
) -> None:
    """Move each request's kept tokens (K and V) to the front of its new block
    list, every layer and KV head in one launch.

    For layer ``l``, head ``h`` and ``i < K``: the token at physical position
    ``src_index[l, h, i]`` of the row ``src_table`` goes to position ``i`` of
    the row ``dst_table`` (block ``dst_table[i // block_size]``, offset
    ``i % block_size``).  Kept tokens may differ per head and per layer.

    Overlap: with ``staged=False`` (one launch, one program per (layer, head)
    walking its tokens in ascending chunks, loads before stores in each chunk)
    the result equals :func:`~.reference.compact_kv_ref` when each
    ``src_index[l, h]`` is strictly increasing and ``dst_table`` either is a
    prefix of ``src_table`` (compaction in place, the engine's case) or shares
    no block with it: token ``i`` then lands on a slot no later chunk reads.
    ``staged=True`` gathers into a temporary buffer and scatters (two
    launches, all (layer, head, chunk) programs in parallel) and is correct
    for any overlap.

    Args:
        cache: stacked cache ``[L, ...]`` in ``layout`` (one of
            :data:`~vllm_kvshrink.kernels.layouts.LAYOUTS`), a single layer (then ``src_index`` is
            ``[H, K]``), or a list of per-layer caches (one launch when they
            are slices of one allocation, else one per layer).
        src_table: ``[n_src_blocks]`` int32/int64 block ids.
        src_index: ``[L, H, K]`` int32/int64 positions in ``src_table``'s row.
        dst_table: ``[>= ceil(K / block_size)]`` block ids.
    """
    check_choice("layout", layout, LAYOUTS)
    layer_dims = 5 if layout == "flash" else 4
    if isinstance(cache, (list, tuple)):
        check_tensor("src_index", src_index, ndim=3)
        if len(cache) != src_index.shape[0]:
            raise ValueError(
                f"cache holds {len(cache)} layers but src_index is "
                f"{tuple(src_index.shape)} (first dimension = layers)"
            )
        stacked = stack_layers(list(cache))
        if stacked is None:
            for i, c in enumerate(cache):
                compact_kv(c, src_table, src_index[i], dst_table, layout, staged)
            return
        cache = stacked
    elif isinstance(cache, torch.Tensor) and cache.dim() == layer_dims:
        check_tensor("src_index", src_index, ndim=2)
        cache, src_index = cache[None], src_index[None]
    torch.ops.kvshrink.compact_kv(cache, src_table, src_index, dst_table, layout, staged)


# ==========================================================================
# merge
# ==========================================================================
def _check_merge(keys, values, weights, group, num_groups) -> None:
    check_tensor("keys", keys, ndim=3, dtypes=FLOAT_DTYPES)
    dev = keys.device
    check_tensor("values", values, ndim=3, dtypes=(keys.dtype,), device=dev)
    check_shape("values", values, tuple(keys.shape))
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_shape("weights", weights, tuple(keys.shape[:2]))
    check_tensor("group", group, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_shape("group", group, tuple(keys.shape[:2]))
    if not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")


def _merge_outputs(keys, num_groups):
    h, _, d = keys.shape
    dev = keys.device
    return (torch.empty(h, num_groups, d, dtype=keys.dtype, device=dev),
            torch.empty(h, num_groups, d, dtype=keys.dtype, device=dev),
            torch.empty(h, num_groups, dtype=torch.int32, device=dev),
            torch.empty(h, num_groups, dtype=torch.float32, device=dev))


@torch.library.custom_op("kvshrink::merge_kv", mutates_args=())
def _merge_kv_op(
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_merge(keys, values, weights, group, num_groups)
    if not use_triton(keys):
        return ref.merge_kv_ref(keys, values, weights, group, num_groups)
    h, n, d = keys.shape
    dev = keys.device
    acc_k = torch.zeros(h * num_groups, d, dtype=torch.float32, device=dev)
    acc_v = torch.zeros_like(acc_k)
    acc_w = torch.zeros(h * num_groups, dtype=torch.float32, device=dev)
    acc_n = torch.zeros(h * num_groups, dtype=torch.int32, device=dev)
    out_k, out_v, _, _ = _merge_outputs(keys, num_groups)
    if h * num_groups == 0:
        return out_k, out_v, acc_n.view(h, num_groups), acc_w.view(h, num_groups)
    block_d = _pow2(d)
    block_n = min(_pow2(n), max(1, 4096 // block_d))
    if n:
        launchable(tk.merge_accumulate_kernel)[(h, triton.cdiv(n, block_n))](
            keys, values, weights, group, acc_k, acc_v, acc_w, acc_n, n, num_groups,
            *keys.stride(), *values.stride(), *weights.stride(), *group.stride(),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n)
    block_r = max(1, 4096 // block_d)
    launchable(tk.merge_finalize_kernel)[(triton.cdiv(h * num_groups, block_r),)](
        acc_k, acc_v, acc_w, out_k, out_v, h * num_groups,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r)
    return out_k, out_v, acc_n.view(h, num_groups), acc_w.view(h, num_groups)


@_merge_kv_op.register_fake
def _(keys, values, weights, group, num_groups):
    _check_merge(keys, values, weights, group, num_groups)
    return _merge_outputs(keys, num_groups)


def merge_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention-weighted average of the K and V vectors of each group into
    one representative (the merge step of the merging methods; which tokens
    form a group is the method's choice).

    Args:
        keys, values: ``[H, N, D]`` fp16/bf16/fp32.
        weights: ``[H, N]`` non-negative weights (e.g. accumulated attention).
        group: ``[H, N]`` group id of each token in ``[0, num_groups)``; any
            other id (e.g. -1) leaves the token out.

    Returns:
        ``(keys [H, G, D], values [H, G, D], counts [H, G] int32,
        weight_sums [H, G] fp32)``; a group with zero total weight gets zeros.
        Accumulation is fp32 with atomics, so the order of additions (and the
        last bits) may vary between runs on a GPU.
    """
    return torch.ops.kvshrink.merge_kv(keys, values, weights, group, num_groups)


# ==========================================================================
# KIVI
# ==========================================================================
def kivi_quantize(
    keys: torch.Tensor, values: torch.Tensor, bits: int, group_size: int
) -> tuple[Quantized, Quantized]:
    """KIVI's scheme (arXiv:2402.02750): keys per channel (groups of
    ``group_size`` tokens), values per token (groups of ``group_size``
    channels).  ``N`` must be a multiple of ``group_size``; KIVI keeps the
    remaining recent tokens in full precision until a group fills."""
    return (quantize(keys, bits, group_size, axis="channel"),
            quantize(values, bits, group_size, axis="token"))


# ==========================================================================
# scoring
# ==========================================================================
def _check_scores(query, key_cache, block_table, seq_len, layout, reduce,
                  values: bool = True) -> tuple[int, ...]:
    check_choice("layout", layout, LAYOUTS)
    check_choice("reduce", reduce, REDUCTIONS)
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("key_cache", key_cache, dtypes=(query.dtype,), device=query.device)
    dims = cache_dims(key_cache, layout, name="key_cache")
    n_layers, n_blocks, hkv, bs, d = dims
    if n_layers != 1:
        raise ValueError(f"key_cache must hold one layer, got {n_layers} (shape "
                         f"{tuple(key_cache.shape)})")
    w, hq, dq = query.shape
    if dq != d:
        raise ValueError(f"query has head dim {dq} but key_cache has {d}")
    if hq % hkv:
        raise ValueError(f"query has {hq} heads, not a multiple of the {hkv} KV heads")
    check_tensor("block_table", block_table, ndim=1, dtypes=INDEX_DTYPES, device=query.device)
    if not isinstance(seq_len, int) or seq_len < w or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= the window length {w} and >= 1, "
                         f"got {seq_len!r}")
    if block_table.numel() * bs < seq_len:
        raise ValueError(f"block_table has {block_table.numel()} blocks of {bs} tokens, "
                         f"too few for seq_len={seq_len}")
    if values:
        _check_values("block_table", block_table[: triton.cdiv(seq_len, bs)], n_blocks,
                      "block ids of key_cache")
    return dims


@torch.library.custom_op("kvshrink::window_scores", mutates_args=())
def _window_scores_op(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    sm_scale: float,
    layout: str,
    reduce: str,
    gqa_mean: bool,
    causal: bool,
) -> torch.Tensor:
    _, _, hkv, bs, d = _check_scores(query, key_cache, block_table, seq_len, layout, reduce)
    if not use_triton(query):
        return ref.window_scores_ref(query, key_cache, layout, block_table, seq_len,
                                     sm_scale, reduce, gqa_mean, causal)
    w, hq, _ = query.shape
    k = kv_views(key_cache, layout)[0][0]  # [nb, Hkv, bs, D]
    dev = query.device
    m = torch.empty(hq, w, dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    out = torch.empty(hkv if gqa_mean else hq, seq_len, dtype=torch.float32, device=dev)
    block_d = _pow2(d, 16)
    block_w = _pow2(min(w, 32), 16)
    block_n = 64 if targets_gpu(query) else 16
    # Triton's CPU interpreter (3.9) computes bf16 dots wrongly: upcast there.
    upcast = interpreting() and query.dtype == torch.bfloat16
    meta = dict(GROUP=hq // hkv, BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_D=block_d,
                BLOCK_W=block_w, BLOCK_N=block_n, CAUSAL=causal, UPCAST=upcast,
                DOT_PRECISION="ieee" if query.dtype == torch.float32 or upcast else "tf32")
    args = (seq_len, w, float(sm_scale), *query.stride(), *k.stride())
    launchable(tk.window_stats_kernel)[(hq, triton.cdiv(w, block_w))](
        query, k, block_table, m, lsum, *args, **meta)
    launchable(tk.window_scores_kernel)[(out.shape[0], triton.cdiv(seq_len, block_n))](
        query, k, block_table, m, lsum, out, *args,
        HEADS_PER_OUT=hq // hkv if gqa_mean else 1, REDUCE_MAX=reduce == "max", **meta)
    return out


@_window_scores_op.register_fake
def _(query, key_cache, block_table, seq_len, sm_scale, layout, reduce, gqa_mean, causal):
    _, _, hkv, _, _ = _check_scores(query, key_cache, block_table, seq_len, layout, reduce,
                                    values=False)
    rows = hkv if gqa_mean else query.shape[1]
    return query.new_empty(rows, seq_len, dtype=torch.float32)


def _check_pool_args(kernel, mode) -> None:
    check_choice("pool_mode", mode, POOL_MODES)
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool={kernel!r} is not allowed; allowed: an odd int >= 1 "
                         f"(1: no pooling)")


def _check_pool(scores, kernel, mode) -> None:
    check_tensor("scores", scores, ndim=2, dtypes=(torch.float32,))
    _check_pool_args(kernel, mode)


@torch.library.custom_op("kvshrink::pool_scores", mutates_args=())
def _pool_scores_op(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    _check_pool(scores, kernel, mode)
    if not use_triton(scores):
        return ref.pool_scores_ref(scores, kernel, mode)
    rows, n = scores.shape
    out = torch.empty_like(scores)
    if scores.numel():
        block_n = min(1024, _pow2(n))
        launchable(tk.pool_scores_kernel)[(rows, triton.cdiv(n, block_n))](
            scores.contiguous(), out, n, KERNEL=kernel, MAX=mode == "max", BLOCK_N=block_n)
    return out


@_pool_scores_op.register_fake
def _(scores, kernel, mode):
    _check_pool(scores, kernel, mode)
    return torch.empty_like(scores)


def pool_scores(scores: torch.Tensor, kernel: int, mode: str = "avg") -> torch.Tensor:
    """Centred pooling of per-token scores ``[rows, N]`` (fp32) over ``kernel``
    (odd) neighbours: SnapKV's pooling of the window's attention, which keeps
    the neighbours of important tokens together.  ``mode`` ``"avg"`` (the mean
    of the taps inside the row, as ``avg_pool1d(count_include_pad=False)``) or
    ``"max"``."""
    return torch.ops.kvshrink.pool_scores(scores, kernel, mode)


def window_scores(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    layout: str,
    sm_scale: float | None = None,
    reduce: str = "sum",
    gqa_mean: bool = True,
    causal: bool = True,
    pool: int = 1,
    pool_mode: str = "avg",
) -> torch.Tensor:
    """Per-token importance from an observation window (SnapKV arXiv:2404.14469,
    H2O arXiv:2306.14048): ``softmax(q . K^T)`` of the window's queries over
    the paged keys, reduced over the window, in two passes (row max and sum of
    exponentials, then normalised probabilities per key) so no ``[W, N]``
    matrix is written to memory.

    Args:
        query: ``[W, Hq, D]``, the last ``W`` positions' queries.
        key_cache: one layer's KV cache in ``layout`` (``L`` absent or 1).
        block_table: ``[>= ceil(seq_len / block_size)]`` the request's blocks.
        seq_len: cached tokens to score (the window's are the last ``W``).
        sm_scale: logit scale, default ``D ** -0.5``.
        reduce: ``"sum"`` or ``"max"`` over the window.
        gqa_mean: average over the query heads of each KV head.
        causal: window query ``w`` sees keys ``<= seq_len - W + w`` only.
        pool: then pool each row over this many (odd) neighbouring tokens
            (:func:`pool_scores`, SnapKV uses 7); 1 leaves the scores as they are.
        pool_mode: ``"avg"`` or ``"max"``.

    Returns:
        fp32 ``[H_kv, seq_len]`` (``gqa_mean``) or ``[Hq, seq_len]``.
    """
    check_choice("layout", layout, LAYOUTS)
    check_tensor("query", query, ndim=3)
    if isinstance(key_cache, torch.Tensor) and key_cache.dim() == (5 if layout == "flash" else 4):
        key_cache = key_cache[None]
    scale = query.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    _check_pool_args(pool, pool_mode)
    scores = torch.ops.kvshrink.window_scores(
        query, key_cache, block_table, seq_len, scale, layout, reduce, gqa_mean, causal)
    return scores if pool == 1 else pool_scores(scores, pool, pool_mode)
