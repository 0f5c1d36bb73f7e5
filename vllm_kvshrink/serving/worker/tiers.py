"""Worker side of tiered storage: tier events and the step's packed batch.

A tier event (:class:`~vllm_kvshrink.serving.plan.TierEvent`) reads every token the
request holds -- its plain row in the model dtype and its packed segments,
dequantized -- puts them in *cache order* (ascending logical position per
(layer, KV head), the order the research path keeps), runs the same tier
policy as the research path (:func:`~vllm_kvshrink.storage.policy.
tier_event`), and only then writes, touching only what changes where it can
(:mod:`.tier_write`: tokens that keep their form keep their bytes, as
:func:`~vllm_kvshrink.storage.policy.apply_tiers` keeps their values).
Nothing is written before everything is read and planned, so a failure
leaves the request as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvshrink.kernels.packed_batch import PackedBatch
from vllm_kvshrink.kernels.cpu_ext import unpack
from vllm_kvshrink.methods import Observation
from vllm_kvshrink.policy.record import tier_record
from vllm_kvshrink.policy.tokens import take_tokens
from vllm_kvshrink.serving import plan as plan_mod
from vllm_kvshrink.serving.worker import tier_write
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


def read_held(comp, ev: plan_mod.TierEvent, st: TierState | None) -> tier_write.Held:
    """Every token the request holds, cache order: plain tokens in the cache
    dtype's values, packed ones dequantized, all float32 -- at a request's
    first event (plain tokens only) in the cache dtype itself, the values the
    plan and the writes would round them back to (:class:`~.tier_write.Held`)."""
    levels = levels_for(ev.storage)
    d, bs, eb = tier_write.geometry(comp)
    layers, heads = len(comp.caches), comp.num_kv_heads
    p = ev.old_len
    kp = comp.read_row(ev.plain_blocks, p, "keys")
    vp = comp.read_row(ev.plain_blocks, p, "values")
    if st is None:  # a request's first event: its plain row is in cache order
        order = torch.arange(p).expand(layers, heads, p)
        return tier_write.Held(kp, vp, torch.zeros(layers, heads, p, dtype=torch.int8),
                               order, order, 0)
    c0 = st.pos_plain.shape[-1]
    tail = st.logical_at_event + torch.arange(p - c0)
    pos_plain = torch.cat([st.pos_plain, tail.expand(layers, heads, -1)], -1)
    ks, vs, lv = [], [], []
    byte_stacks = [tier_write.region_bytes(stack) for stack, _ in comp.stacks]
    for block, form, n in st.segments:
        pf = paged_form(form, d, bs, eb)
        pages = torch.cat([bv[:, block] for bv in byte_stacks])  # [L, H, rb]
        k, v = unpack(pf, pages.reshape(layers * heads, 1, -1), n)
        ks.append(k.view(layers, heads, n, d))
        vs.append(v.view(layers, heads, n, d))
        lv.append(torch.full((n,), levels.index(form), dtype=torch.int8))
    m = sum(x.shape[2] for x in ks)
    keys = torch.cat(ks + [kp.float()], 2)
    values = torch.cat(vs + [vp.float()], 2)
    level = torch.cat(lv + [torch.zeros(p, dtype=torch.int8)]).expand(layers, heads, -1)
    pos = torch.cat([st.pos_packed, pos_plain], -1)
    order = pos.argsort(-1)
    return tier_write.Held(take_tokens(keys, order), take_tokens(values, order),
                           level.gather(2, order),
                           pos.gather(2, order), order, m)


def apply_event(comp, ev: plan_mod.TierEvent, r
                ) -> tuple[plan_mod.TierResult, TierState, dict | None]:
    """Run one tier event (see the module docstring); returns the result for
    the scheduler, the request's new :class:`TierState` and the event's
    record (:func:`~vllm_kvshrink.policy.record.tier_record`), built only when
    the worker records events (``None`` otherwise: its nested lists of every
    kept token cost a millisecond or two per event)."""
    comp.check_fault(ev.req_id)
    levels = levels_for(ev.storage)
    _, bs, _ = tier_write.geometry(comp)
    layers, heads = len(comp.caches), comp.num_kv_heads
    if len(ev.plain_blocks) * bs < ev.old_len:
        raise RuntimeError(f"plain row holds {len(ev.plain_blocks) * bs} slots, plan "
                           f"says {ev.old_len} tokens")
    with comp.timed("event_read"):
        held = read_held(comp, ev, r.tier)
    n = held.keys.shape[2]
    with comp.timed("event_plan"):
        method = comp.method_for(ev)
        cdt = tier_write.cache_dtype(comp)
        q = qpos = None
        if method.needs_queries:
            q, qpos = comp.queries_for(ev.req_id, n, ev.logical_len)
        work = dict(r.method_state) if method.stateful else r.method_state
        obs = Observation(held.keys.to(cdt), q, qpos, comp.scales,
                          rope_inv_freq=comp.rope_inv_freq, heads=comp.heads)
        memo = dict(r.tier_memo)  # kept only if the event completes
        plan = tier_event(method, obs, work, levels, ev.budget_bytes, ev.sink_tokens,
                          ev.recent_tokens, held.values.to(cdt), held.level,
                          bf16_free=FULL in ev.storage, memo=memo)
        keep = plan.keep()
        lev = plan.level.gather(2, keep)
    with comp.timed("event_pack"):
        segments = r.tier.segments if r.tier is not None else []
        laid = tier_write.in_place(comp, levels, plan.counts, plan.level, held,
                                   ev.plain_blocks, segments, ev.dest_blocks)
        if laid is None:
            if segments:  # tokens that keep a packed form must keep their bytes
                raise RuntimeError("a plain block of a request holding packed tokens "
                                   "is shared; its tier event cannot write in place")
            laid = tier_write.rewrite(comp, levels, plan.counts, plan.level, held,
                                      ev.dest_blocks, [])
        layout, write = laid
    comp.heads.agree()  # every rank has read and planned (or none writes)
    with comp.timed("event_write"):
        write()
    if method.stateful:
        r.method_state = work
    r.tier_memo = memo
    kept_before = held.level.gather(2, keep)
    demoted = float(((lev > kept_before)).sum()) / (layers * heads)
    new_state = TierState(segments=layout.segments, pos_packed=layout.pos_packed,
                          pos_plain=layout.pos_plain, logical_at_event=ev.logical_len)
    res = plan_mod.TierResult(
        plain_blocks=layout.plain_blocks, segments=layout.segments,
        counts={name: plan.counts[i] for i, name in enumerate(levels)},
        demoted=demoted, evicted=float(n - keep.shape[-1]))
    rec = None
    if comp.config.record_dir:
        rec = tier_record(ev.logical_len, ev.old_len, keep.shape[-1], ev.method,
                          held.pos.gather(2, keep).tolist(), lev.tolist(), levels,
                          plan.counts, plan.nbytes, ev.budget_bytes)
    return res, new_state, rec


def packed_batch(comp, req_ids, num_computed, num_scheduled, row_of
                 ) -> tuple[PackedBatch | None, list[int]]:
    """The step's requests that hold packed blocks, for the attention kernel,
    and their indices in the batch; ``row_of(req_id)``: its plain block-table
    row (asked for those only)."""
    d, bs, eb = tier_write.geometry(comp)
    reqs, forms, index, rows = [], [], {}, []
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
            rows.append(i)
            reqs.append(dict(q_start=start, q_len=n, plain_len=plain,
                             plain_blocks=list(row_of(req_id))[: -(-plain // bs)],
                             segments=segs))
        start += n
    if not reqs:
        return None, []
    return PackedBatch.build(reqs, forms), rows
