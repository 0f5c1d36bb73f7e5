"""Worker side of tiered storage: tier events and the step's packed batch.

A tier event (:class:`~vllm_kvshrink.serving.plan.TierEvent`) reads every token the
request holds -- its plain row in the model dtype and its packed segments,
dequantized -- puts them in *cache order* (ascending logical position per
(layer, KV head), the order the research path keeps), runs the same tier
policy as the research path (:func:`~vllm_kvshrink.storage.policy.
tier_event`), and only then writes: the ``bf16`` tokens into the first
destination blocks as a plain row, each packed level into the next blocks
(:func:`~vllm_kvshrink.kernels.quant.pack`, from the values the tokens hold
now, as :func:`~vllm_kvshrink.storage.policy.apply_tiers` re-packs them).
Nothing is written before everything is read and planned, so a failure
leaves the request as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvshrink.kernels.packed_batch import PackedBatch
from vllm_kvshrink.kernels.quant import pack, unpack
from vllm_kvshrink.methods import Observation
from vllm_kvshrink.policy.record import tier_record
from vllm_kvshrink.serving import plan as plan_mod
from vllm_kvshrink.serving.worker.kv_layout import row_slots, write_tokens_stacked
from vllm_kvshrink.storage import FULL
from vllm_kvshrink.storage.paged import paged_form
from vllm_kvshrink.storage.policy import levels_for, tier_event


@dataclass
class TierState:
    """What the worker remembers of one tiered request between events."""

    #: packed segments ``(block, form, n)``, storage order
    segments: list
    #: ``[L, H, M]`` logical position of each packed token, storage order
    pos_packed: torch.Tensor
    #: ``[L, H, c0]`` logical positions of the plain row's first ``c0`` tokens;
    #: later plain tokens are at ``logical_at_event + (index - c0)``
    pos_plain: torch.Tensor
    logical_at_event: int


def _byte_stacks(comp):
    """``(bytes [L', NB, H, region_bytes], layers)`` per stacked cache view."""
    out = []
    for stack, layers in comp.stacks:
        lp, nb, h = stack.shape[:3]
        out.append((stack.view(torch.uint8).reshape(lp, nb, h, -1), layers))
    return out


def _geometry(comp):
    c = comp.caches[0]
    return comp.head_size, comp.block_size, c.element_size()


def zero_blocks(comp, blocks: list[int]) -> None:
    """Zero ``blocks`` in every layer (packed pages leaving the packed form)."""
    if not blocks:
        return
    t = torch.tensor(sorted(set(blocks)), dtype=torch.int64)
    for bv, _ in _byte_stacks(comp):
        bv[:, t] = 0


def read_held(comp, ev: plan_mod.TierEvent, st: TierState | None):
    """Every token the request holds, cache order: ``(keys, values)``
    ``[L, H, N, D]`` (plain tokens in the cache dtype's values, packed ones
    dequantized, all float32), ``level [L, H, N]`` int8 index into the levels,
    ``pos [L, H, N]`` logical positions."""
    levels = levels_for(ev.storage)
    d, bs, eb = _geometry(comp)
    layers, heads = len(comp.caches), comp.num_kv_heads
    p = ev.old_len
    slots = row_slots(ev.plain_blocks, torch.arange(p), bs)
    kp = comp.read_keys(*slots).float()
    vp = comp.read_values(*slots).float()
    if st is None:
        pos_plain = torch.arange(p).expand(layers, heads, p)
        ks, vs, lv, ps = [], [], [], []
    else:
        c0 = st.pos_plain.shape[-1]
        tail = st.logical_at_event + torch.arange(p - c0)
        pos_plain = torch.cat([st.pos_plain, tail.expand(layers, heads, -1)], -1)
        ks, vs, lv, ps = [], [], [], [st.pos_packed]
        stacks = _byte_stacks(comp)
        for block, form, n in st.segments:
            pf = paged_form(form, d, bs, eb)
            pages = torch.cat([bv[:, block] for bv, _ in stacks])  # [L, H, rb]
            k, v = unpack(pf, pages.reshape(layers * heads, 1, -1), n)
            ks.append(k.view(layers, heads, n, d))
            vs.append(v.view(layers, heads, n, d))
            lv.append(torch.full((n,), levels.index(form), dtype=torch.int8))
    keys = torch.cat(ks + [kp], 2)
    values = torch.cat(vs + [vp], 2)
    level = torch.cat(lv + [torch.zeros(p, dtype=torch.int8)]).expand(layers, heads, -1)
    pos = torch.cat(ps + [pos_plain], -1)
    order = pos.argsort(-1)
    idx = order[..., None].expand(-1, -1, -1, d)
    return (keys.gather(2, idx), values.gather(2, idx), level.gather(2, order),
            pos.gather(2, order))


def apply_event(comp, ev: plan_mod.TierEvent, r
                ) -> tuple[plan_mod.TierResult, TierState, dict]:
    """Run one tier event (see the module docstring); returns the result for
    the scheduler, the request's new :class:`TierState` and the event's
    record (:func:`~vllm_kvshrink.policy.record.tier_record`)."""
    comp.check_fault(ev.req_id)
    levels = levels_for(ev.storage)
    d, bs, eb = _geometry(comp)
    layers, heads = len(comp.caches), comp.num_kv_heads
    if len(ev.plain_blocks) * bs < ev.old_len:
        raise RuntimeError(f"plain row holds {len(ev.plain_blocks) * bs} slots, plan "
                           f"says {ev.old_len} tokens")
    with comp.timed("event_read"):
        keys, values, current, pos = read_held(comp, ev, r.tier)
    n = keys.shape[2]
    with comp.timed("event_plan"):
        method = comp.method_for(ev)
        cdt = comp.caches[0].dtype if comp.caches[0].is_floating_point() else torch.float32
        q = qpos = None
        if method.needs_queries:
            q, qpos = comp.queries_for(ev.req_id, n, ev.logical_len)
        work = dict(r.method_state) if method.stateful else r.method_state
        obs = Observation(keys.to(cdt), q, qpos, comp.scales,
                          rope_inv_freq=comp.rope_inv_freq)
        plan = tier_event(method, obs, work, levels, ev.budget_bytes, ev.sink_tokens,
                          ev.recent_tokens, values.to(cdt), current,
                          bf16_free=FULL in ev.storage)
        keep = plan.keep()
        lev = plan.level.gather(2, keep)
        kpos = pos.gather(2, keep)
    with comp.timed("event_pack"):
        # Lay out: plain row first, then each packed level's pages.
        need = -(-plan.counts[0] // bs)
        pages_of = {}
        for i, name in enumerate(levels[1:], 1):
            if plan.counts[i]:
                pages_of[name] = -(-plan.counts[i] // paged_form(name, d, bs, eb).capacity)
        if need + sum(pages_of.values()) > len(ev.dest_blocks):
            raise RuntimeError(f"the plan needs {need + sum(pages_of.values())} blocks, "
                               f"{len(ev.dest_blocks)} were given")
        dest = list(ev.dest_blocks)
        plain_ids, dest = dest[:need], dest[need:]
        writes, segments, pos_packed = [], [], []
        pos0 = kpos[..., :0]  # plain tokens' positions (none if no level-0 token)
        for i, name in enumerate(levels):
            c = plan.counts[i]
            if not c:
                continue
            sel = (lev == i).nonzero()[:, 2].view(layers, heads, c)  # ascending
            src = keep.gather(2, sel)
            idx = src[..., None].expand(-1, -1, -1, d)
            k, v = keys.gather(2, idx), values.gather(2, idx)
            if i == 0:
                pos0 = pos.gather(2, src)
                writes.append(("plain", k, v))
                continue
            pf = paged_form(name, d, bs, eb)
            pages = pack(pf, k.reshape(-1, c, d), v.reshape(-1, c, d))
            ids, dest = dest[: pages.shape[1]], dest[pages.shape[1]:]
            writes.append(("packed", ids, pages.view(layers, heads, len(ids), -1)))
            for j, b in enumerate(ids):
                segments.append((b, name, min(pf.capacity, c - j * pf.capacity)))
            pos_packed.append(pos.gather(2, src))
    with comp.timed("event_write"):
        # Everything read and planned: now write.  Blocks that held packed
        # pages and hold none now are zeroed first: their bytes read as the
        # model dtype can be NaN, and vLLM's kernel multiplies masked slots by
        # zero.
        layout = comp.token_layout()
        stacks = _byte_stacks(comp)
        new_packed = {b for b, _, _ in segments}
        old_packed = [b for b, _, _ in (r.tier.segments if r.tier is not None else [])]
        zero_blocks(comp, [b for b in old_packed if b not in new_packed])
        for w in writes:
            if w[0] == "plain":
                _, k, v = w
                blocks, offs = row_slots(plain_ids, torch.arange(plan.counts[0]), bs)
                for (stack, sl) in comp.stacks:
                    write_tokens_stacked(stack, layout, k[sl].to(cdt), v[sl].to(cdt),
                                         blocks, offs)
            else:
                _, ids, pages = w
                t = torch.tensor(ids, dtype=torch.int64)
                for bv, sl in stacks:
                    bv[:, t] = pages[sl].permute(0, 2, 1, 3)
    if method.stateful:
        r.method_state = work
    kept_before = current.gather(2, keep)
    demoted = float(((lev > kept_before)).sum()) / (layers * heads)
    new_state = TierState(
        segments=segments,
        pos_packed=(torch.cat(pos_packed, -1) if pos_packed
                    else torch.zeros(layers, heads, 0, dtype=torch.int64)),
        pos_plain=pos0, logical_at_event=ev.logical_len)
    res = plan_mod.TierResult(
        plain_blocks=plain_ids, segments=segments,
        counts={name: plan.counts[i] for i, name in enumerate(levels)},
        demoted=demoted, evicted=float(n - keep.shape[-1]))
    rec = tier_record(ev.logical_len, ev.old_len, keep.shape[-1], ev.method, kpos.tolist(),
                      lev.tolist(), levels, plan.counts, plan.nbytes, ev.budget_bytes)
    return res, new_state, rec


def packed_batch(comp, req_ids, num_computed, num_scheduled, row_of) -> PackedBatch | None:
    """The step's requests that hold packed blocks, for the attention kernel;
    ``row_of(req_id)``: its plain block-table row (asked for those only)."""
    d, bs, eb = _geometry(comp)
    reqs, forms, index = [], [], {}
    start = 0
    for i, req_id in enumerate(req_ids):
        n = int(num_scheduled[i])
        r = comp.reqs.get(req_id)
        st = r.tier if r is not None else None
        if n > 0 and st is not None and st.segments:
            segs = []
            for block, form, cnt in st.segments:
                if form not in index:
                    index[form] = len(forms)
                    forms.append(paged_form(form, d, bs, eb))
                segs.append((block, index[form], cnt))
            plain = int(num_computed[i]) + n - comp.offsets.get(req_id, 0)
            reqs.append(dict(q_start=start, q_len=n, plain_len=plain,
                             plain_blocks=list(row_of(req_id))[: -(-plain // bs)],
                             segments=segs))
        start += n
    if not reqs:
        return None
    return PackedBatch.build(reqs, forms)
