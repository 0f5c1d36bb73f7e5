"""Plain PyTorch twins of the lab kernels (:mod:`.ops`).

They define what the kernels compute (tests compare the two) and are what the
ops run on CPU tensors when Triton is not interpreting.  Shapes follow the
ops' docstrings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_kvshrink.kernels.layouts import kv_views


# --------------------------------------------------------------------------
# compaction
# --------------------------------------------------------------------------
def compact_kv_ref(
    cache: torch.Tensor,
    layout: str,
    src_table: torch.Tensor,
    src_index: torch.Tensor,
    dst_table: torch.Tensor,
) -> None:
    """Move kept tokens to the front of ``dst_table``, every layer and head.

    For layer ``l``, KV head ``h`` and ``i < K``: the token at physical position
    ``src_index[l, h, i]`` of the block list ``src_table`` (K and V) is written
    to position ``i`` of the block list ``dst_table``.  Everything is read
    before anything is written, so any overlap of sources and destinations is
    allowed.

    Args:
        cache: stacked cache in ``layout`` (see :mod:`.layouts`).
        src_table: ``[n_src_blocks]`` block ids.
        src_index: ``[L, H, K]`` positions in ``src_table``'s row.
        dst_table: ``[>= ceil(K / block_size)]`` block ids.
    """
    k, v = kv_views(cache, layout)
    l, _, h, bs, _ = k.shape
    n_keep = src_index.shape[-1]
    if n_keep == 0:
        return
    s = src_index.long()
    sb = src_table.long()[s // bs]
    so = s % bs
    li = torch.arange(l, device=cache.device)[:, None, None]
    hi = torch.arange(h, device=cache.device)[None, :, None]
    k_vals = k[li, sb, hi, so]  # [L, H, K, D] (a copy)
    v_vals = v[li, sb, hi, so]
    i = torch.arange(n_keep, device=cache.device)
    db = dst_table.long()[i // bs][None, None, :]
    do = (i % bs)[None, None, :]
    k[li, db, hi, do] = k_vals
    v[li, db, hi, do] = v_vals


# --------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------
def merge_kv_ref(
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted average of the K and V vectors of each group.

    ``out[h, g] = sum_{n: group[h, n] == g} w[h, n] * x[h, n] / sum w`` computed
    in fp32; a group with zero total weight gets zeros.  Tokens whose group id
    is outside ``[0, num_groups)`` (e.g. ``-1``) belong to no group.

    Args:
        keys, values: ``[H, N, D]``; weights: ``[H, N]`` (non-negative, e.g.
            accumulated attention); group: ``[H, N]`` int group ids.

    Returns:
        ``(keys [H, G, D], values [H, G, D], counts [H, G] int32,
        weight_sums [H, G] fp32)``, keys/values in the input dtype.
    """
    h, n, d = keys.shape
    dev = keys.device
    valid = (group >= 0) & (group < num_groups)
    w = torch.where(valid, weights.float(), torch.zeros((), device=dev))
    flat = (torch.arange(h, device=dev)[:, None] * num_groups
            + group.long().clamp(0, max(num_groups - 1, 0))).flatten()
    wsum = torch.zeros(h * num_groups, device=dev).index_add_(0, flat, w.flatten())
    cnt = torch.zeros(h * num_groups, dtype=torch.int32, device=dev).index_add_(
        0, flat, valid.flatten().to(torch.int32))
    outs = []
    for x in (keys, values):
        acc = torch.zeros(h * num_groups, d, device=dev).index_add_(
            0, flat, (x.float() * w[..., None]).reshape(h * n, d))
        out = torch.where(wsum[:, None] > 0, acc / wsum[:, None].clamp_min(1e-30),
                          torch.zeros((), device=dev))
        outs.append(out.view(h, num_groups, d).to(x.dtype))
    return outs[0], outs[1], cnt.view(h, num_groups), wsum.view(h, num_groups)


# --------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------
def window_scores_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    layout: str,
    block_table: torch.Tensor,
    seq_len: int,
    sm_scale: float,
    reduce: str = "sum",
    gqa_mean: bool = True,
    causal: bool = True,
) -> torch.Tensor:
    """Per-token attention scores of an observation window (materialised).

    ``p[h, w, n] = softmax_n(sm_scale * q[w, h] . k[n, h // group])`` over the
    ``seq_len`` cached tokens, where with ``causal`` query ``w`` (at position
    ``seq_len - W + w``) sees only keys ``n <= seq_len - W + w``.  Reduced over
    the window by ``reduce`` (``"sum"`` or ``"max"``), then, with ``gqa_mean``,
    averaged over the query heads sharing a KV head.

    Args:
        query: ``[W, Hq, D]``; key_cache: one layer (``L`` absent) or
            ``[1, ...]`` in ``layout``; block_table: ``[>= ceil(seq_len/bs)]``.

    Returns:
        ``[H_kv, seq_len]`` with ``gqa_mean`` else ``[Hq, seq_len]``, fp32.
    """
    cache = key_cache if key_cache.dim() == (6 if layout == "flash" else 5) else key_cache[None]
    k, _ = kv_views(cache, layout)
    k = k[0]  # [nb, H, bs, D]
    hkv, bs = k.shape[1], k.shape[2]
    w_len, hq, _ = query.shape
    pos = torch.arange(seq_len, device=query.device)
    keys = k[block_table.long()[pos // bs], :, pos % bs]  # [N, Hkv, D]
    keys = keys.float().repeat_interleave(hq // hkv, dim=1)  # [N, Hq, D]
    s = torch.einsum("whd,nhd->hwn", query.float(), keys) * sm_scale
    if causal:
        qpos = seq_len - w_len + torch.arange(w_len, device=query.device)
        s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = p.sum(1) if reduce == "sum" else p.amax(1)
    if gqa_mean:
        out = out.view(hkv, hq // hkv, seq_len).mean(1)
    return out


def pool_scores_ref(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Centred pooling of per-token scores ``[rows, N]`` over ``kernel`` (odd)
    neighbours (SnapKV's clustering of the observation window's attention):
    ``"max"``, or ``"avg"`` over the taps inside the row."""
    x = scores.float()[:, None, :]
    if mode == "max":
        out = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        out = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return out[:, 0, :]
