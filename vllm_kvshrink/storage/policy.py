"""The tier policy: which form each cached token is held in.

Given an importance method's scores per (layer, KV head, token), the forms a
request may use and a budget in bytes, choose every token's form -- or evict
it -- so that the bytes held fit the budget.  Sinks and the recent window
stay in ``bf16``.

The choice is a rate-distortion allocation.  Per (layer, head) the
unprotected tokens are ranked by score and the scores normalised to sum to 1;
``w[r]`` is the mean over (layer, head) of the ``r``-th largest weight.  A
form ``f`` costs ``b_f`` bytes per token and loses ``d_f`` of a token's worth
(its measured relative RMS K/V error on this request's cache; eviction
loses everything, ``d = 1``, for 0 bytes).  For a multiplier ``lam`` each
rank takes the form minimising ``w[r] * d_f + lam * b_f``; ``w`` is
decreasing, so higher ranks take more precise forms and the solution is a
split of the ranking into consecutive runs, one per form.  ``lam`` is found
by bisection so that the exact bytes (:meth:`StorageForm.nbytes`) fit.

Every (layer, head) holds the *same number* of tokens in each form -- vLLM
gives a request one block table, so a packed block's token count is shared
by every layer and head -- but *which* tokens differs per (layer, head).

Demotion only, unless an original is kept: a token already held in a form
can stay there, move to a form with fewer bytes, or be evicted, never go
back up (its original bits are gone).  The research path's optional offload
copy (:mod:`vllm_kvshrink.lab.hf.offload`) keeps originals of demoted and
evicted tokens outside the budget; a token whose original is there counts as
``bf16`` for the plan, so it may be promoted.  If some (layer, head) has
fewer candidates for a form than the split asks for, the count is cut to
what every (layer, head) can fill; the bytes left over stay unused (the
budget still holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vllm_kvshrink.policy.heads import LOCAL, HeadGroup
from vllm_kvshrink.policy.nbytes import token_bytes
from vllm_kvshrink.policy.softmax import window_probs
from vllm_kvshrink.policy.tokens import take_tokens
from vllm_kvshrink.storage import FULL, get_form

EVICTED = -1


@dataclass
class TierPlan:
    """The forms of one request's tokens after an event.

    Attributes:
        levels: form names, most bytes first; ``levels[0]`` is ``bf16``.
        level: ``[L, H, N]`` int8 index into ``levels`` of each token's form,
            :data:`EVICTED` for evicted tokens.
        counts: tokens per (layer, head) in each level (the same for all).
        nbytes: exact bytes held by the kept tokens, all (layer, head)s.
    """

    levels: tuple[str, ...]
    level: torch.Tensor
    counts: list[int]
    nbytes: int
    #: ``[L, H, N]`` the scorer's scores the plan was made from
    scores: torch.Tensor | None = None
    #: what the allocation minimises: ``sum_r w[r] * d`` over the unprotected
    #: ranks with the levels' counts in rank order (eviction ``d = 1``)
    distortion: float | None = None

    def keep(self) -> torch.Tensor:
        """``[L, H, K]`` ascending indices of the tokens not evicted."""
        kept = self.level >= 0
        k = int(kept[0, 0].sum())
        return kept.nonzero()[:, 2].view(*kept.shape[:2], k)


def levels_for(storage: Sequence[str]) -> tuple[str, ...]:
    """The levels a request with ``storage`` uses: ``bf16`` (always, for sinks
    and the recent window) then the other forms by decreasing bytes."""
    rest = sorted((s for s in storage if s != FULL),
                  key=lambda n: -get_form(n).bytes_per_token(64))
    return (FULL, *rest)


def held_bytes(level: torch.Tensor, levels: Sequence[str], head_dim: int) -> int:
    """Exact bytes of a ``[L, H, N]`` level map."""
    total = 0
    for i, name in enumerate(levels):
        counts = (level == i).sum(-1).flatten().tolist()
        f = get_form(name)
        total += sum(f.nbytes(int(c), head_dim) for c in counts)
    return total


def measure_distortion(keys: torch.Tensor, values: torch.Tensor,
                       levels: Sequence[str], sample: int = 256,
                       heads: HeadGroup = LOCAL) -> list[float]:
    """Relative error ``sqrt(|x - x'|^2 / |x|^2)`` of K and V (root of the
    mean of the two squared) of each level, on the first ``sample`` tokens of every (layer,
    head); ``keys``/``values`` ``[L, H, N, D]``; sums over every KV head of
    ``heads``."""
    k = keys[:, :, :sample].reshape(-1, min(sample, keys.shape[2]), keys.shape[-1])
    v = values[:, :, :sample].reshape(k.shape)
    l, h = keys.shape[:2]
    out = []
    for name in levels:
        kh, vh = get_form(name).roundtrip(k, v)
        # squared error and squared norm of K and V per (layer, head): [4, L, H]
        part = torch.stack([s.view(l, h) for a, b in ((kh, k), (vh, v))
                            for s in (((a.float() - b.float()) ** 2).sum((1, 2)),
                                      (b.float() ** 2).sum((1, 2)))])
        tot = heads.gather(part, 2).sum((1, 2))  # over every rank's heads
        err = [float(tot[0] / tot[1].clamp_min(1e-30)), float(tot[2] / tot[3].clamp_min(1e-30))]
        out.append(math.sqrt(sum(err) / 2))
    return out


def attention_distortion(obs, values: torch.Tensor, levels: Sequence[str],
                         sink_tokens: int, recent_tokens: int,
                         max_layers: int = 6) -> list[float] | None:
    """Each level's cost measured where it matters, on the attention output of
    the observation window's queries: with every unprotected token held in
    level ``f``, ``|o_f - o| / |o_evict - o|``, where ``o_evict`` attends the
    sinks and the recent window only.  It counts what a K/V error does through
    the softmax (noise in a key moves attention *to* the token as well as
    away), which the relative K/V error misses.  Measured on ``max_layers``
    layers spread over the depth (a level's cost is one number for the
    request).  ``None`` without queries."""
    if obs.queries is None or obs.queries.shape[2] == 0:
        return None
    pick = torch.linspace(0, obs.keys.shape[0] - 1, min(max_layers, obs.keys.shape[0]))
    pick = pick.round().long().unique()
    keys = obs.keys[pick]
    values = values[pick]
    l, h, n, d = keys.shape
    protect = torch.zeros(n, dtype=torch.bool)
    protect[:sink_tokens] = True
    protect[max(0, n - recent_tokens):] = True
    if bool(protect.all()):
        return None
    q = obs.queries[pick]
    scale = obs.scale_tensor()[pick]
    exists = None if obs.key_mask is None else obs.key_mask[pick]  # tokens that are held

    def out(k, v, mask=None):
        held = exists
        if mask is not None:
            held = mask.expand(l, h, n) if held is None else held & mask
        p = window_probs(q, k, obs.query_pos, scale, held)
        return torch.einsum("lhgwn,lhnd->lhgwd", p, v.float())

    def dist(a, b) -> float:  # over every rank's heads
        return float(obs.heads.gather(a - b, 1).norm())

    ref = out(keys, values)
    evict = max(dist(out(keys, values, protect), ref), 1e-30)
    res = []
    flat_k = keys.reshape(l * h, n, d)
    flat_v = values.reshape(l * h, n, d)
    for name in levels:
        if name == FULL:
            res.append(0.0)
            continue
        kq, vq = get_form(name).roundtrip(flat_k, flat_v)
        kq = torch.where(protect[None, :, None], flat_k, kq).view(l, h, n, d)
        vq = torch.where(protect[None, :, None], flat_v, vq).view(l, h, n, d)
        res.append(min(1.0, dist(out(kq, vq), ref) / evict))
    return res


def _splitter(w: torch.Tensor, cost: list[float], dist: list[float], keep: float = 0.0):
    """``split(lam)``: tokens per level (most precise first) that minimise
    ``w[r] * d + lam * b`` (``+ keep`` for a kept token) rank by rank; ``w``
    ``[R]`` decreasing.  The bisection calls it some seventy times per event,
    so it runs in NumPy (float32, the same products and the same first-minimum
    ties as the tensors would give) with ``w * d`` formed once."""
    wd = (w.detach().cpu().numpy().astype(np.float32)[:, None]
          * np.array(dist + [1.0], np.float32)[None, :])
    if keep:
        wd[:, :-1] += np.float32(keep)
    b = np.array(cost + [0.0], np.float32)[None, :]
    levels = len(cost)

    def split(lam: float) -> list[int]:
        choice = (wd + np.float32(lam) * b).argmin(-1)
        # w decreasing -> choice non-decreasing up to ties; enforce runs.
        choice = np.maximum.accumulate(choice)
        return np.bincount(choice, minlength=levels + 1)[:levels].tolist()

    return split


def plan_tiers(
    scores: torch.Tensor,
    levels: Sequence[str],
    budget_bytes: int,
    head_dim: int,
    sink_tokens: int,
    recent_tokens: int,
    distortion: Sequence[float],
    current: torch.Tensor | None = None,
    bf16_free: bool = True,
    available: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    heads: HeadGroup = LOCAL,
    keep_cost: float = 0.0,
    page_tokens: Sequence[int] | None = None,
) -> TierPlan:
    """Assign every token a level so the bytes held fit ``budget_bytes``.

    Args:
        scores: ``[L, H, N]`` importance (higher = more worth keeping).
        levels: from :func:`levels_for`.
        budget_bytes: bytes the request may hold, all (layer, head)s.
        distortion: ``d_f`` per level (``levels[0]`` should be 0).
        current: ``[L, H, N]`` the level each token is held in now
            (:data:`EVICTED` never appears: evicted tokens are gone), or
            ``None`` (all ``bf16``).
        bf16_free: whether unprotected tokens may stay in ``bf16`` (the
            storage names it); sinks and the recent window always do.
        available: ``[L, H, N]`` bool, the tokens that exist (``None``: all);
            the others are evicted whatever their score (the promotion view
            spans every logical position).
        weight: ``[L, H, N]`` factors (> 0) on each token's score after the
            scores of its row are shifted to start at 0 (``None``: 1); the
            promotion view uses it for a margin a token must clear to come
            back from eviction.
        heads: the KV heads the plan spans (tensor parallelism: ``scores``
            hold this rank's, ``budget_bytes`` covers every rank's; the
            counts, the same on every rank, are the single-rank plan's).
        keep_cost: a price on every kept token, in units of the mean weight
            of an unprotected token (``keep_cost / M`` added to each kept
            rank's cost): attention's work grows with the tokens kept, not
            with their bytes, so a positive price evicts the tail and spends
            its bytes on more precise forms.  0 (what both paths run) is the
            pure rate-distortion plan; ``benchmarks/bench_tier_plan.py``
            measures what a price costs in distortion.
        page_tokens: tokens one block holds in each level (``levels[0]``:
            the block size), or ``None`` (what both paths run: the budget
            counts the tokens' bytes).  Given, the budget counts whole
            blocks, as the pool lends them -- every level's tokens rounded
            up to its blocks, a block at the bf16 bytes of ``page_tokens[0]``
            tokens of every (layer, head), the budget rounded up to whole
            blocks as eviction's token budget is; ``bench_tier_plan.py``
            measures what that costs in distortion.

    Returns:
        :class:`TierPlan`.  Raises ``ValueError`` if the protected tokens alone
        exceed the budget.
    """
    l, h, n = scores.shape
    nl = len(levels)
    forms = [get_form(x) for x in levels]
    if current is None:
        current = torch.zeros(l, h, n, dtype=torch.int8)
    protect = torch.zeros(n, dtype=torch.bool)
    protect[:sink_tokens] = True
    protect[max(0, n - recent_tokens):] = True
    n_prot = int(protect.sum())
    if bool((current[:, :, protect] != 0).any()):
        raise ValueError("a protected token (sink or recent) is not held in bf16")
    rows = l * h * heads.size  # (layer, KV head) pairs on every rank
    prot_bytes = rows * forms[0].nbytes(n_prot, head_dim)
    if prot_bytes > budget_bytes:
        raise ValueError(f"the sinks and recent window ({n_prot} tokens, {prot_bytes} "
                         f"bytes) exceed the byte budget {budget_bytes}")
    free = ~protect
    if available is not None and not bool(available[:, :, protect].all()):
        raise ValueError("a protected token (sink or recent) is not available")
    if weight is not None:  # rank by the weighted, shifted scores
        z = scores.float().nan_to_num(nan=0.0, neginf=0.0, posinf=0.0)
        base = z if available is None else z.masked_fill(~available, float("inf"))
        scores = (z - base.amin(-1, keepdim=True)).clamp_min(0.0) * weight
    s = scores.float().nan_to_num(nan=0.0)[:, :, free]  # [L, H, M]
    have = None if available is None else available[:, :, free]
    low = s if have is None else s.masked_fill(~have, float("inf"))
    s = s - low.amin(-1, keepdim=True).clamp_max(0.0)
    if have is not None:
        s = s.masked_fill(~have, 0.0)
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    w = heads.gather(torch.sort(s, dim=-1, descending=True).values, 1).mean((0, 1))  # [M]
    cost = [f.bytes_per_token(head_dim) for f in forms]
    dist = list(distortion)
    if not bf16_free:  # bf16 stays for protected tokens only
        dist[0] = 1e30

    if not keep_cost >= 0:
        raise ValueError(f"keep_cost={keep_cost}; allowed: a price >= 0 on each kept token")
    if page_tokens is not None:
        if len(page_tokens) != nl or min(page_tokens) < 1:
            raise ValueError(f"page_tokens={list(page_tokens)}: one count >= 1 per level "
                             f"of {list(levels)}")
        block = page_tokens[0] * token_bytes(rows, head_dim)  # one bf16 block, every row
        budget_bytes = -(-budget_bytes // block) * block
        if block * -(-n_prot // page_tokens[0]) > budget_bytes:
            raise ValueError(f"the sinks and recent window ({n_prot} tokens) take more "
                             f"blocks than the byte budget rounds up to")

    def exact(counts: list[int]) -> int:
        c = list(counts)
        c[0] += n_prot
        if page_tokens is not None:
            return block * sum(-(-k // p) for k, p in zip(c, page_tokens))
        return rows * sum(f.nbytes(k, head_dim) for f, k in zip(forms, c))

    split = _splitter(w, cost, dist, keep_cost / max(1, w.shape[0]))
    lo, hi = 0.0, 1.0
    while exact(split(hi)) > budget_bytes and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if exact(split(mid)) > budget_bytes:
            lo = mid
        else:
            hi = mid
    counts = split(hi)
    while exact(counts) > budget_bytes:  # per-group rounding at the edge
        i = max(j for j in range(nl) if counts[j])
        counts[i] -= 1

    # Fill the levels, most precise first, per (layer, head), from the
    # highest-scored tokens allowed there (held now in that level or above).
    level = torch.full((l, h, n), EVICTED, dtype=torch.int8)
    level[:, :, protect] = 0
    # Finite scores, so an eligible token always ranks above an ineligible one
    # (a NaN or -inf score would otherwise tie with the -inf of taken tokens).
    ranked = scores.float().nan_to_num(nan=-3e38, neginf=-3e38, posinf=3e38)
    ranked = ranked.masked_fill(protect, float("-inf"))
    taken = protect.expand(l, h, n).clone()
    final = []
    for i in range(nl):
        eligible = (~taken) & (current <= i)
        if available is not None:
            eligible &= available
        fill = heads.gather(eligible.sum(-1), 1)  # every rank's (layer, head)s
        want = min(counts[i], int(fill.min())) if counts[i] else 0
        if want:
            r = ranked.masked_fill(~eligible, float("-inf"))
            idx = torch.topk(r, want, dim=-1).indices
            level.scatter_(2, idx, i)
            taken.scatter_(2, idx, True)
        final.append(want)
    # each level's weight is its run of the ranking, in rank order; the rest is evicted
    cum = np.concatenate([[0.0], np.cumsum(w.double().cpu().numpy())])
    mass = np.diff(cum[np.cumsum([0] + final)])
    objective = float(mass @ np.array(dist)) + cum[-1] - cum[sum(final)]
    final[0] += n_prot
    return TierPlan(tuple(levels), level, final, held_bytes(level, levels, head_dim),
                    scores, float(objective))


#: A request's per-form distortion is measured at its first tier event and
#: again once it holds this many times the tokens it held when last measured;
#: events in between reuse it.  Measuring it is the costliest part of planning
#: (every form stored and read back, attention over six layers: a third of
#: an event's time), and it drifts slowly: on 12 decode-heavy requests of the
#: default model (events every 32 tokens) int8's and int4's moved by a median
#: 19-24 % two events after the first and about 50 % six or more after.
DISTORTION_REGROWTH = 1.25


def form_distortion(obs, values: torch.Tensor, levels: Sequence[str], sink_tokens: int,
                    recent_tokens: int, memo: dict | None = None) -> list[float]:
    """Each level's distortion for the plan (:func:`attention_distortion`,
    else the K/V error for query-free scorers), taken from ``memo`` (a
    request's, kept between its events and updated here) while it holds
    fewer than :data:`DISTORTION_REGROWTH` times the tokens it held when
    last measured."""
    n = obs.keys.shape[2]
    if (memo and memo.get("levels") == tuple(levels)
            and n < memo["tokens"] * DISTORTION_REGROWTH):
        return list(memo["distortion"])
    dist = attention_distortion(obs, values, levels, sink_tokens, recent_tokens)
    if dist is None:  # query-free scorers: the K/V error itself
        dist = measure_distortion(obs.keys, values, levels, heads=obs.heads)
    if memo is not None:
        memo.update(levels=tuple(levels), tokens=n, distortion=list(dist))
    return dist


def tier_event(method, obs, state: dict, levels: Sequence[str], budget_bytes: int,
               sink_tokens: int, recent_tokens: int, values: torch.Tensor,
               current: torch.Tensor | None, bf16_free: bool = True,
               carry: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, memo: dict | None = None) -> TierPlan:
    """One tiered compression event of one request: score with ``method``
    (any importance method), take each form's distortion on this cache
    (:func:`form_distortion`, ``memo`` the request's), plan the forms, carry
    the method's state to the kept tokens (or to ``carry`` ``[L, H, K]``:
    the promotion view keeps every position).  The research path calls
    exactly this; ``values`` ``[L, H, N, D]``; tokens outside
    ``obs.key_mask`` are never kept."""
    if method.merges:
        raise ValueError(f"method {method.name!r} merges K/V; tiered storage takes an "
                         f"importance method")
    from vllm_kvshrink.methods.base import score_event

    d = obs.keys.shape[-1]
    scores = score_event(method, obs, state, values)
    dist = form_distortion(obs, values, levels, sink_tokens, recent_tokens, memo)
    plan = plan_tiers(scores, levels, budget_bytes, d, sink_tokens, recent_tokens, dist,
                      current=current, bf16_free=bf16_free, available=obs.key_mask,
                      weight=weight, heads=obs.heads)
    method.update(state, plan.keep() if carry is None else carry)
    return plan


def apply_tiers(plan: TierPlan, keys: torch.Tensor, values: torch.Tensor,
                keep: torch.Tensor | None = None, current: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens' K/V ``[L, H, K, D]`` as their forms hold them.

    A token entering a quantized level is stored from what it holds now (a
    token demoted from ``bf16`` from its original bits, one already quantized
    from its dequantized value).  A token that stays in a
    :attr:`~vllm_kvshrink.storage.base.StorageForm.token_local` form keeps
    what it holds (the engine does not touch its bytes); a form whose
    parameters span tokens (per-channel key groups) is stored again as a
    whole, so its parameters cover exactly the tokens in it.  The bytes are
    :func:`held_bytes`'s either way.  ``keys``/``values`` ``[L, H, N, D]``
    and ``current`` ``[L, H, N]`` (the levels held, ``None``: all ``bf16``)
    before the event."""
    if keep is None:
        keep = plan.keep()
    l, h, k = keep.shape
    d = keys.shape[-1]
    kk, vv = take_tokens(keys, keep), take_tokens(values, keep)
    lev = plan.level.gather(2, keep)  # [L, H, K]
    was = None if current is None else current.gather(2, keep)
    for i, name in enumerate(plan.levels):
        if i == 0 or plan.counts[i] == 0:
            continue
        form = get_form(name)
        entering = lev == i
        if form.token_local and was is not None:
            entering &= was != i
        c = int(entering.sum(-1).max())  # rows may enter unevenly: padded below
        if not c:
            continue
        # Row by row, the entering tokens first (ascending), padded with
        # copies of a row's last entering token where rows differ.
        order = torch.sort(entering.to(torch.int8), dim=-1, descending=True, stable=True)
        pos = order.indices[..., :c]
        real = order.values[..., :c].bool()
        pidx = pos[..., None].expand(l, h, c, d)
        a, b = take_tokens(kk, pos), take_tokens(vv, pos)
        ka, vb = form.roundtrip(a.reshape(l * h, c, d), b.reshape(l * h, c, d))
        ka = torch.where(real[..., None], ka.view(l, h, c, d), a)
        vb = torch.where(real[..., None], vb.view(l, h, c, d), b)
        kk = kk.scatter(2, pidx, ka)
        vv = vv.scatter(2, pidx, vb)
    return kk, vv
