"""Promotion from an offload copy (research path).

Tiered storage demotes for good: once a token is held in int4 or evicted,
its original bits are gone.  With ``method_args={"offload": f}`` a request
also keeps, *outside* its KV budget, the original (bf16) K/V of up to
``floor(f * logical_length)`` demoted or evicted tokens per (layer, KV head)
-- a host-memory copy in a serving system.  At every event the scorer sees
the whole sequence: resident tokens as they are held, offloaded ones from
their originals; the tier policy (:func:`~vllm_kvshrink.storage.policy.tier_event`)
treats an offloaded token as ``bf16`` (its original is at hand), so a token
the scorer now expects to matter is *promoted*: brought back into a more
precise form, or back from eviction, from its original bits.  The new
offload copy is then the highest-scored demoted and evicted tokens whose
originals are known, up to the bound; the rest are dropped for good.

Four byte counts are kept apart from the resident bytes the budget bounds:

* ``offload_bytes`` -- originals held in the copy (16-bit K and V);
* ``promoted_bytes`` -- originals read back for promoted tokens (K + V);
* ``scan_bytes`` -- offloaded keys the scorer reads to score them (a real
  system would score a compressed sketch of them instead; counted as the
  16-bit keys);
* ``written_bytes`` -- originals copied out when a token first leaves bf16.

The view spans every logical position (one index per position, the same in
every (layer, head)), so the scorer's per-token state carries over whole
from event to event; positions neither resident nor offloaded are masked
(:attr:`~vllm_kvshrink.methods.base.Observation.key_mask`) and never chosen.

Prior art: offloading the KV cache and fetching back what the next queries
need -- InfiniGen (Lee et al. 2024, arXiv:2406.19707), Quest (Tang et al.
2024, arXiv:2406.10774), ShadowKV (Sun et al. 2024, arXiv:2410.21465),
ArkVale (Chen et al. 2024, NeurIPS) for recalling evicted pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vllm_kvshrink.policy.nbytes import token_bytes
from vllm_kvshrink.storage.policy import EVICTED, apply_tiers, tier_event


@dataclass
class Offload:
    """One request's offload copy: originals of every logical position seen
    at an event (``keys``/``values`` ``[L, H, P, D]``) of which only
    ``held`` (``[L, H, P]`` bool) count as kept; the rest are gone."""

    fraction: float
    #: an evicted token's score is divided by this before it competes with
    #: resident ones (1: none); damps the churn of a noisy scorer
    margin: float = 1.0
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    held: torch.Tensor | None = None
    #: tokens promoted and bytes moved, summed over the request's events
    stats: dict = field(default_factory=lambda: {
        "events": 0, "promoted_tokens": 0, "promoted_bytes": 0, "scan_bytes": 0,
        "written_bytes": 0, "dropped_tokens": 0})

    def nbytes(self) -> int:
        """Bytes of the originals held (16-bit K and V)."""
        if self.held is None:
            return 0
        return int(self.held.sum()) * token_bytes(1, self.keys.shape[-1])

    def capacity(self, logical: int) -> int:
        """Most tokens per (layer, KV head) the copy may hold."""
        return math.floor(round(self.fraction * logical, 9))


def _dense(resident: torch.Tensor, logical: torch.Tensor, p: int) -> torch.Tensor:
    """``[L, H, K, ...]`` resident entries -> ``[L, H, P, ...]`` by logical
    position (zeros elsewhere)."""
    l, h = logical.shape[:2]
    shape = (l, h, p) + tuple(resident.shape[3:])
    out = resident.new_zeros(shape)
    idx = logical.long()
    if resident.dim() == 4:
        idx = idx[..., None].expand(-1, -1, -1, resident.shape[-1])
    return out.scatter(2, idx, resident)


def promote_event(runner, cache, state: dict, logical: int, budget: int) -> dict:
    """One tiered event with promotion over ``cache`` (a
    :class:`~vllm_kvshrink.lab.hf.research.ResearchCache` with an ``offload``).
    Returns the event record; rewrites the cache's resident K/V, positions
    and levels and the offload copy."""
    cfg = runner.cfg
    off: Offload = cache.offload
    l, h, k = cache.logical.shape
    p = logical
    d = cache.keys[0].shape[-1]
    res_k, res_v = torch.stack(cache.keys), torch.stack(cache.values)  # [L, H, K, D]
    pos = cache.logical.long()
    resident = torch.zeros(l, h, p, dtype=torch.bool).scatter(2, pos, True)
    res_level = torch.full((l, h, p), EVICTED, dtype=torch.int8).scatter(2, pos, cache.level)
    keys, values = _dense(res_k, pos, p), _dense(res_v, pos, p)
    # Positions appended since the last event are resident in bf16: their
    # originals join the copy's store (not its held set).
    p0 = 0 if off.keys is None else off.keys.shape[2]
    new_k, new_v = keys[:, :, p0:], values[:, :, p0:]
    if off.keys is None:
        off.keys, off.values = new_k.clone(), new_v.clone()
        off.held = torch.zeros(l, h, p, dtype=torch.bool)
    else:
        off.keys = torch.cat([off.keys, new_k], 2)
        off.values = torch.cat([off.values, new_v], 2)
        off.held = torch.cat([off.held, torch.zeros(l, h, p - p0, dtype=torch.bool)], 2)
    held = off.held
    # The view: offloaded originals over whatever the resident form holds.
    sel = held[..., None]
    keys = torch.where(sel, off.keys, keys)
    values = torch.where(sel, off.values, values)
    exists = resident | held
    original = (resident & (res_level == 0)) | held  # bits known exactly
    current = torch.where(original, torch.zeros_like(res_level), res_level)
    current = current.masked_fill(~exists, 0)

    obs = runner._observation(cache, logical, keys)
    obs.key_mask = exists
    every = torch.arange(p).expand(l, h, p)
    weight = None
    if off.margin != 1.0:  # an evicted token must clear the margin to return
        weight = torch.ones(l, h, p).masked_fill(~resident, 1.0 / off.margin)
    plan = tier_event(runner.method, obs, state, cache.levels, budget, cfg.sink_tokens,
                      cfg.recent_tokens, values, current,
                      bf16_free="bf16" in cfg.storage, carry=every, weight=weight,
                      memo=cache.tier_memo)
    keep = plan.keep()
    new_k_res, new_v_res = apply_tiers(plan, keys, values, keep, current)
    new_level = plan.level
    # Traffic: a kept token more precise than it was held (or back from
    # eviction) was read from the copy.
    up = (new_level >= 0) & ((res_level < 0) | (new_level < res_level)) & held
    tok = token_bytes(1, d)  # one token's 16-bit K + V of one (layer, head)
    off.stats["promoted_tokens"] += int(up.sum())
    off.stats["promoted_bytes"] += int(up.sum()) * tok
    off.stats["scan_bytes"] += int(held.sum()) * (tok // 2)  # the keys alone
    # The new copy: demoted or evicted tokens whose originals are known,
    # highest score first, up to the bound.
    cap = off.capacity(logical)
    cand = original & (new_level != 0)
    score = plan.scores.float().nan_to_num(nan=-3e38, neginf=-3e38, posinf=3e38)
    score = score.masked_fill(~cand, float("-inf"))
    n_cand = cand.sum(-1)
    new_held = torch.zeros_like(held)
    m = min(cap, int(n_cand.max()))
    if m > 0:
        top = torch.topk(score, m, dim=-1).indices
        new_held.scatter_(2, top, True)
        new_held &= cand
    off.stats["written_bytes"] += int((new_held & ~held).sum()) * tok
    off.stats["dropped_tokens"] += int((held & ~new_held & (new_level < 0)).sum())
    off.held = new_held
    off.stats["events"] += 1
    for layer in range(runner.num_layers):
        cache.keys[layer] = new_k_res[layer].to(cache.keys[layer].dtype)
        cache.values[layer] = new_v_res[layer].to(cache.values[layer].dtype)
    cache.logical = keep.to(cache.logical.dtype)
    cache.level = new_level.gather(2, keep)
    return runner._tier_record(cache, logical, k, plan, budget,
                               offload_bytes=off.nbytes(), promoted=int(up.sum()))

