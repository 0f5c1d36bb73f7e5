"""The PyTorch reference of packed attention: dequantize every packed token
(:func:`~.quant.unpack`), then attend with one softmax over packed and plain
tokens.  The C++ (:mod:`.cpu_ext`) and Triton (:mod:`.triton_packed`)
kernels, which dequantize inside their dot products, are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvshrink.kernels.layouts import kv_views
from vllm_kvshrink.kernels.packed_batch import IndexMap, PackedBatch, check
from vllm_kvshrink.kernels.quant import PagedForm, region_view, unpack


@dataclass
class Segment:
    """``n`` tokens of form ``pf`` in block ``block`` (every layer, every head)."""

    block: int
    pf: PagedForm
    n: int


def read_segments(cache: torch.Tensor, segments: list[Segment]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K/V of one layer's packed segments, ``[Hkv, N, D]`` float32
    each (rotated back), in segment order."""
    regions = region_view(cache)
    h = cache.shape[1]
    d = cache.shape[3] // 2
    ks, vs = [torch.zeros(h, 0, d)], [torch.zeros(h, 0, d)]
    for s in segments:
        k, v = unpack(s.pf, regions[s.block][:, None], s.n)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 1), torch.cat(vs, 1)


def attention_ref(q: torch.Tensor, k_plain: torch.Tensor, v_plain: torch.Tensor,
                  k_packed: torch.Tensor, v_packed: torch.Tensor, scale: float
                  ) -> torch.Tensor:
    """Attention of one request: ``q [T, Hq, D]`` (its last ``T`` tokens, the
    newest of the plain region), causal over ``k_plain/v_plain [Hkv, S, D]``
    (the bf16 region, ``S >= T``), and every packed token ``[Hkv, N, D]``
    (older than every query).  Dequantize, then softmax: the reference both
    kernels are checked against.  Returns ``[T, Hq, D]`` float32."""
    t, hq, d = q.shape
    hkv, s = k_plain.shape[:2]
    g = hq // hkv
    k = torch.cat([k_packed.float(), k_plain.float()], 1)  # [Hkv, N + S, D]
    v = torch.cat([v_packed.float(), v_plain.float()], 1)
    n = k_packed.shape[1]
    qq = q.float().view(t, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    logits = torch.einsum("hgtd,hnd->hgtn", qq, k) * scale
    pos = torch.arange(n + s)
    limit = n + s - t + torch.arange(t)  # query i sees up to its own token
    visible = pos[None, :] <= limit[:, None]
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("hgtn,hnd->hgtd", p, v)
    return out.permute(2, 0, 1, 3).reshape(t, hq, d)


def _plain(cache: torch.Tensor, layout, blocks: torch.Tensor, n: int):
    """``[Hkv, n, D]`` K and V of a plain region."""
    bs, d = cache.shape[2], cache.shape[3] // 2
    idx = torch.arange(n)
    blk = blocks.long()[idx // bs]
    off = idx % bs
    if isinstance(layout, IndexMap):  # element (t, e) of a region at index[t * D + e]
        regions = cache.reshape(cache.shape[0], cache.shape[1], -1)[blk]  # [n, H, R]
        at = off[:, None] * d + torch.arange(d)  # [n, D]
        pick = lambda index: regions.gather(  # noqa: E731
            2, index.long()[at][:, None, :].expand(-1, regions.shape[1], -1))
        return pick(layout.key_index).transpose(0, 1), pick(layout.value_index).transpose(0, 1)
    k, v = kv_views(cache[None], layout)  # [1, NB, H, bs, D]
    return k[0][blk, :, off].transpose(0, 1), v[0][blk, :, off].transpose(0, 1)


def reference(q: torch.Tensor, cache: torch.Tensor, layout: str, batch: PackedBatch,
              scale: float) -> torch.Tensor:
    """Dequantize, then attend: ``[sum(q_len), Hq, D]`` float32, the rows of
    each request in batch order."""
    check(q, cache, layout, batch)
    outs = []
    for r in range(batch.num_reqs):
        qs, ql, pl = int(batch.q_start[r]), int(batch.q_len[r]), int(batch.plain_len[r])
        kp, vp = _plain(cache, layout, batch.plain_table[r], pl)
        a, b = int(batch.seg_start[r]), int(batch.seg_start[r + 1])
        segs = [Segment(int(batch.seg_block[i]), batch.forms[int(batch.seg_form[i])],
                        int(batch.seg_n[i])) for i in range(a, b)]
        kq, vq = read_segments(cache, segs)
        outs.append(attention_ref(q[qs: qs + ql], kp, vp, kq, vq, scale))
    d = q.shape[-1]
    return torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], d, dtype=torch.float32)
