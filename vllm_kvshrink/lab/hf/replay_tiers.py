"""Replays the engine's tier events in transformers: masks *and* dequantized K/V.

At each tier event the engine recorded, per (layer, KV head), the logical
positions it kept and the form each one is held in from then on
(``kept``/``level``/``storage``).  A token computed after an event at logical
length ``E`` attended the kept tokens as their forms give them back, and every
token from ``E`` on in full precision.  This replay runs one transformers
forward pass over the whole sequence with an attention function that, per
layer, walks the events in order: the K/V a token holds are the previous ones
passed through its form's store-and-read-back
(:meth:`~vllm_kvshrink.storage.base.StorageForm.roundtrip`) whenever an event
gives it a form other than ``bf16`` it did not hold before (a demotion
re-packs the value held, as the engine does; a token that stays in a
token-local form keeps its bytes, as the engine leaves them), and the queries
between two events attend exactly what was held.
No KV cache, no paged layout, no packed pages: an independent computation of
what the engine should have produced.
"""

from __future__ import annotations

from typing import Iterable

import torch

from vllm_kvshrink.policy.record import by_logical_len
from vllm_kvshrink.storage import get_form

_IMPL = "kvshrink_replay_tiers"
_EVENTS: list[dict] = []


def _held_after(k: torch.Tensor, v: torch.Tensor, e: dict, layer: int,
                form_of: torch.Tensor):
    """K/V ``[Hkv, T, D]`` after event ``e``: tokens before its logical length
    take their recorded form; ``form_of`` ``[Hkv, T]`` (the form index each
    position was held in after the previous event, 0 where none was
    recorded) is updated in place.  Returns (k, v, visible ``[Hkv, start]``)."""
    start = e["logical_len"]
    kept = torch.tensor(e["kept"][layer], dtype=torch.long)  # [Hkv, K]
    level = torch.tensor(e["level"][layer], dtype=torch.long)
    h, _, d = k.shape
    visible = torch.zeros(h, start, dtype=torch.bool)
    visible.scatter_(1, kept, True)
    k, v = k.clone(), v.clone()
    was = form_of.gather(1, kept)
    for i, name in enumerate(e["storage"]):
        if i == 0:
            continue
        form = get_form(name)
        enter = (level == i) & (was != i) if form.token_local else level == i
        for row in range(h):  # rows may differ in how many tokens enter
            pos = kept[row][enter[row]]
            if not pos.numel():
                continue
            kq, vq = form.roundtrip(k[row, pos][None], v[row, pos][None])
            k[row, pos], v[row, pos] = kq[0], vq[0]
    form_of.zero_()
    form_of.scatter_(1, kept, level)
    return k, v, visible


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               **kwargs):
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    scaling = d**-0.5 if scaling is None else scaling
    layer = module.layer_idx
    k, v = key[0].float(), value[0].float()
    q = query[0].float()
    out = torch.zeros(hq, t, d)
    visible = torch.ones(hkv, t, t, dtype=torch.bool).tril()
    bounds = [e["logical_len"] for e in _EVENTS if e["logical_len"] < t] + [t]
    form_of = torch.zeros(hkv, t, dtype=torch.long)
    seg_start = 0
    for i, end in enumerate(bounds):
        # Queries seg_start..end-1 attend what is held now.
        kk = k.repeat_interleave(g, 0)
        vv = v.repeat_interleave(g, 0)
        s = torch.matmul(q[:, seg_start:end], kk.transpose(-1, -2)) * scaling
        m = visible[:, seg_start:end].repeat_interleave(g, 0)
        p = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1)
        out[:, seg_start:end] = torch.matmul(p, vv)
        if i < len(bounds) - 1:
            e = _EVENTS[i]
            k, v, vis = _held_after(k, v, e, layer, form_of)
            start = e["logical_len"]
            visible[:, start:, :start] = vis[:, None, :]
        seg_start = end
    return out.to(query.dtype)[None].transpose(1, 2).contiguous(), None


@torch.no_grad()
def replay_tier_logits(model, token_ids: list[int], events: Iterable[dict], first: int = 0
                       ) -> torch.Tensor:
    """Logits of ``model`` over ``token_ids`` under the recorded tier events
    (evictions masked, kept tokens in their forms), for the positions
    ``first`` to ``T - 1`` (``[T - first, vocab]``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(_IMPL, _attention)
    previous = model.config._attn_implementation
    _EVENTS[:] = by_logical_len(events)
    try:
        model.set_attn_implementation(_IMPL)
        t = len(token_ids)
        out = model(input_ids=torch.tensor([token_ids]), position_ids=torch.arange(t)[None],
                    use_cache=False, logits_to_keep=t - first)
        return out.logits[0].float()
    finally:
        model.set_attn_implementation(previous)
        _EVENTS.clear()
