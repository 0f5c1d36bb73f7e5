"""Adaptive selection: per request and per layer, trust the scorer that has
been predicting this request's attention best.

At every event the observation window of ``W`` queries is split in two: the
first ``W - h`` queries (``h = max(1, W // 4)``) are what every candidate
scores from, the last ``h`` are held out.  A candidate's *coverage* on a layer
is the share of the held-out queries' attention mass (GQA-group mean, mean
over the held-out queries) that falls on the ``k = ceil(adaptive_frac * M)``
tokens it ranks highest, per KV head (mean over heads), where the ``M``
measured tokens are those the selection really decides on: past the first
``adaptive_sink`` tokens and before the window's first query token (the
window's tokens are always kept: the config enforces ``obs_window <=
recent_tokens``).  A running accuracy per (candidate, layer) and request,
``acc = decay * acc + (1 - decay) * coverage`` (first measured event:
``coverage``), picks each layer's candidate (ties: the first listed), and that
candidate's scores computed from the FULL window are returned for the layer.

What is held out, per kind of candidate:

* stateless (``snapkv``, ``tova``, ``expected_attention``, ``knorm``,
  ``streaming``): scored once on the first-part queries only (the held-out
  check) and, when some layer chose it, once more on the full window;
* stateful (``ema``, ``h2o``, ``temporal``): the held-out check scores on a
  throw-away copy of the candidate's state -- the previous event's state plus
  the first-part queries, as if the event had happened ``h`` queries earlier;
  the real scoring call (full window) runs exactly once per event on the
  candidate's own nested state, so its state advances once.  For ``temporal``
  the check also drops the previous predictions from the copy, so the
  held-out call neither records accuracy nor trains (its labels are taken by
  the full call).  ``temporal`` runs with ``online=False`` unless the method
  arguments give ``online`` explicitly (determinism).

Nothing is random: the same inputs give the same choices and scores.

Prior art: choosing the budget per layer or per head from the observed
attention (AdaKV, Feng et al. 2024, arXiv:2407.11550; PyramidKV, Cai et al.
2024, arXiv:2406.02069) and composing or switching compressors (NVIDIA
kvpress's composed presses, e.g. ``ComposedPress``/``PerLayerCompressionPress``).
This method is plainly a selection among the existing scorers by their
held-out coverage: it adds no new importance signal of its own, and keeps
budgets uniform.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from typing import Any, Sequence

import torch

from vllm_kvshrink.methods.base import Observation, ScoringMethod
from vllm_kvshrink.methods.params import Param, unit

#: Registry names that may not be candidates (no scorer, not an importance
#: method, or adaptive itself).
EXCLUDED = ("none", "minicache", "semantic", "adaptive")


def parse_scorers(value: str, allowed: Sequence[str]) -> list[str]:
    """The candidate names of an ``adaptive_scorers`` value; ``ValueError``
    naming the key, the value and what is allowed."""
    names = [s.strip() for s in str(value).split(",")]
    if not all(names):
        why = "an empty name"
    elif any(s not in allowed for s in names):
        why = f"{next(s for s in names if s not in allowed)!r} is not a candidate"
    elif len(set(names)) != len(names):
        why = "a name repeats"
    else:
        return names
    raise ValueError(f"adaptive_scorers={value!r}: {why}; allowed: distinct, "
                     f"comma-separated names of {', '.join(allowed)}")


class AdaptiveSelect(ScoringMethod):
    """Per request and layer, the candidate scorer with the best running
    held-out coverage (see the module docstring).

    Prior art: AdaKV (arXiv:2407.11550) and PyramidKV (arXiv:2406.02069)
    adapt budgets per head / layer; kvpress composes presses.  This is a
    selection among existing scorers by held-out kept-mass coverage.

    Args:
        candidates: ``(name, method)`` pairs, in priority order (ties go to
            the first).
        decay: weight of the past in the running accuracy, ``0 < decay < 1``.
        frac: share of the measured tokens counted as kept by the check.
        sink: first tokens left out of the check (the event keeps them).
        history: per-event records kept in :attr:`events` (oldest dropped).
    """

    name = "adaptive"
    needs_queries = True
    stateful = True
    paper = ("selection among existing scorers by held-out coverage; prior art: "
             "AdaKV arXiv:2407.11550, PyramidKV arXiv:2406.02069, kvpress composed "
             "presses")

    def __init__(self, candidates: Sequence[tuple[str, ScoringMethod]],
                 decay: float = 0.5, frac: float = 0.25, sink: int = 4,
                 history: int = 256) -> None:
        candidates = list(candidates)
        if not candidates:
            raise ValueError("adaptive needs at least one candidate scorer")
        names = [n for n, _ in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"adaptive candidates {names} repeat a name")
        for n, m in candidates:
            if n in EXCLUDED or getattr(m, "merges", False) or getattr(
                    m, "cross_layer", False):
                raise ValueError(f"adaptive candidate {n!r} is not an importance "
                                 f"scorer; allowed: any importance method but "
                                 f"{', '.join(EXCLUDED)}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"adaptive_decay={decay!r}; allowed: 0 < x < 1")
        if not 0.0 < frac < 1.0:
            raise ValueError(f"adaptive_frac={frac!r}; allowed: 0 < x < 1")
        if sink < 0:
            raise ValueError(f"adaptive_sink={sink!r}; allowed: a whole number >= 0")
        self.candidates = candidates
        self.names = names
        self.decay, self.frac, self.sink = decay, frac, sink
        #: the last ``history`` events (dicts, see :meth:`summary`)
        self.events: deque = deque(maxlen=history)
        self._lock = threading.Lock()
        self._totals = self._fresh_totals()

    # ------------------------------------------------------------ scoring
    def _fresh_totals(self) -> dict:
        c = {n: 0 for n in self.names}
        return {"events": 0, "measured_events": 0, "choices": dict(c),
                "coverage_sum": {n: 0.0 for n in self.names},
                "coverage_n": dict(c), "entropy_sum": 0.0, "entropy_n": 0}

    @staticmethod
    def _split(obs: Observation) -> tuple[Observation, int, int]:
        """The first-part sub-observation, ``w1`` (its query count) and ``h``."""
        w = obs.queries.shape[2]
        h = max(1, w // 4)
        w1 = w - h
        attn = obs.attention()  # [L, H, W, N]; computes (and caches) the probs
        # Every other field (scales, RoPE, a key mask) as the event has it;
        # softmax is per query, so the first part's attention is a slice.
        sub = dataclasses.replace(
            obs, queries=obs.queries[:, :, :w1], query_pos=obs.query_pos[:w1],
            values=None if obs.values is None else obs.value_tensor,
            _probs=obs._probs[:, :, :, :w1], _attn=attn[:, :, :w1])
        return sub, w1, h

    @staticmethod
    def _probe(method: ScoringMethod, sub: Observation, state: dict) -> torch.Tensor:
        """Scores from the first-part queries, leaving ``state`` untouched."""
        if not method.stateful:
            return method.score_layers(sub, {})
        tmp = dict(state)
        if getattr(method, "predictor", None) is not None:
            # temporal: no labels for the previous predictions here (no
            # accuracy record, no training step); the full call takes them.
            tmp.pop("pred", None)
        return method.score_layers(sub, tmp)

    def _coverage(self, scores: torch.Tensor, target: torch.Tensor,
                  total: torch.Tensor, exists: torch.Tensor | None, s0: int,
                  p0: int, heads) -> torch.Tensor:
        """``[L]`` held-out mass share on each layer's top-k (mean over heads);
        ``k = ceil(frac * M)`` of the ``M`` measured tokens that exist."""
        s = scores[:, :, s0:p0].to(torch.float32).nan_to_num(nan=float("-inf"))
        m = p0 - s0
        if exists is None:
            k = torch.full(s.shape[:2], max(1, math.ceil(self.frac * m)))
        else:  # tokens that are gone are never picked
            s = s.masked_fill(~exists, float("-inf"))
            k = torch.ceil(self.frac * exists.sum(-1).to(torch.float64)).clamp_min(1)
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        picked = torch.arange(m)[None, None, :] < k[..., None]
        mass = (target.gather(-1, order) * picked).sum(-1)
        # every KV head of the layer, those of other tensor-parallel ranks too
        return heads.gather(mass / total, 1).mean(dim=1)

    def score_layers(self, obs, state):
        if obs.queries is None or obs.queries.shape[2] == 0:
            raise ValueError("adaptive needs an observation window of queries")
        l, hkv, n = obs.keys.shape[:3]
        sub, w1, h = self._split(obs)
        probs = obs.probs()  # [L, H, G, W, N]
        # Held-out queries' attention entropy, normalised by log N.
        held_p = probs[:, :, :, w1:]
        ent = -torch.special.xlogy(held_p, held_p).sum(-1)  # [L, H, G, h]
        ent = obs.heads.gather(ent, 1)
        ent_l = (ent / math.log(n) if n > 1 else torch.zeros_like(ent)).mean((1, 2, 3))
        # Fresh containers: the caller's state (and a shallow copy of it, as
        # the engine makes) is never written through.
        prev_subs = state.get("sub", {})
        subs = {name: dict(prev_subs.get(name, {})) for name in self.names}
        p0 = int(obs.query_pos.min())
        s0 = min(self.sink, p0)
        acc = state.get("acc")
        cov = None
        if w1 >= 1 and p0 - s0 >= 1:
            target = obs.attention()[:, :, w1:, s0:p0].mean(dim=2)  # [L, H, M]
            total = target.sum(-1).clamp_min(1e-12)
            mask = getattr(obs, "key_mask", None)
            exists = None if mask is None else mask[:, :, s0:p0].to(torch.bool)
            cov = torch.stack([
                self._coverage(self._probe(m, sub, subs[name]), target, total, exists,
                               s0, p0, obs.heads)
                for name, m in self.candidates])  # [C, L]
            acc = cov if acc is None else self.decay * acc + (1 - self.decay) * cov
        if acc is None:
            choice = [0] * l
        else:
            best = acc.max(dim=0).values
            choice = [next(c for c in range(len(self.names)) if acc[c, i] == best[i])
                      for i in range(l)]
        out = torch.empty(l, hkv, n, dtype=torch.float32)
        chosen = set(choice)
        for c, (name, m) in enumerate(self.candidates):
            if not (m.stateful or c in chosen):
                continue
            # The one full-window call: stateful candidates advance here.
            full = m.score_layers(obs, subs[name] if m.stateful else {})
            for i in range(l):
                if choice[i] == c:
                    out[i] = full[i].to(torch.float32)
        state["_sub"] = subs
        state["_acc"] = acc
        state["_event"] = {
            "choice": [self.names[c] for c in choice],
            "coverage": None if cov is None else {
                name: cov[c].tolist() for c, name in enumerate(self.names)},
            "entropy": float(ent_l.mean()),
            "entropy_per_layer": ent_l.tolist(),
            "held_out": h,
        }
        return out

    def update(self, state, keep):
        subs = state.pop("_sub")
        for name, m in self.candidates:
            m.update(subs[name], keep)
        state["sub"] = subs
        acc = state.pop("_acc")
        if acc is not None:
            state["acc"] = acc
        ev = state.pop("_event")
        state["choice"] = ev["choice"]
        state["n"] = keep.shape[2]
        self._record(ev)

    # ------------------------------------------------------------- stats
    def _record(self, ev: dict) -> None:
        with self._lock:
            t = self._totals
            t["events"] += 1
            for name in ev["choice"]:
                t["choices"][name] += 1
            if ev["coverage"] is not None:
                t["measured_events"] += 1
                for name, per_layer in ev["coverage"].items():
                    t["coverage_sum"][name] += sum(per_layer) / len(per_layer)
                    t["coverage_n"][name] += 1
            t["entropy_sum"] += ev["entropy"]
            t["entropy_n"] += 1
            self.events.append(ev)

    def summary(self) -> dict:
        """Over every event this object scored and committed (all requests):
        ``choices`` (layer choices per candidate), ``coverage`` (mean
        held-out coverage per candidate, ``None`` before any measurement),
        ``entropy`` (mean normalised held-out attention entropy) and the
        counts; ``last_choice``: the newest event's choice per layer."""
        with self._lock:
            t = self._totals
            return {
                "candidates": list(self.names),
                "events": t["events"],
                "measured_events": t["measured_events"],
                "choices": dict(t["choices"]),
                "coverage": {n: (t["coverage_sum"][n] / t["coverage_n"][n]
                                 if t["coverage_n"][n] else None) for n in self.names},
                "entropy": t["entropy_sum"] / t["entropy_n"] if t["entropy_n"] else None,
                "last_choice": list(self.events[-1]["choice"]) if self.events else None,
            }

    def stats(self) -> dict[str, Any]:
        """:meth:`summary` (the hook a runner's stats can call)."""
        return self.summary()


#: What ``adaptive_scorers`` may name: every importance method of the registry
#: but :data:`EXCLUDED` (checked against the registry by
#: :func:`vllm_kvshrink.methods.adaptive_candidates`).  The parameters of these
#: methods also apply to ``adaptive``, each when its candidate is listed.
CANDIDATES = ("streaming", "h2o", "snapkv", "tova", "knorm", "ema", "temporal",
              "expected_attention")


def _scorers_ok(value) -> bool:
    from vllm_kvshrink.methods import adaptive_candidates

    try:
        parse_scorers(value, adaptive_candidates())
    except ValueError:
        return False
    return True


#: adaptive's own parameters (gathered by the registry, :mod:`vllm_kvshrink.methods`).
PARAMS = {
    "adaptive_scorers": Param(str, "snapkv,expected_attention,ema", "adaptive: the "
                              "candidate scorers, comma-separated, in priority order "
                              "(ties go to the first)", _scorers_ok,
                              "distinct, comma-separated names of " + ", ".join(CANDIDATES)),
    "adaptive_decay": Param(float, 0.5, "adaptive: weight of the past in each "
                            "candidate's running held-out coverage", unit, "0 < x < 1"),
    "adaptive_frac": Param(float, 0.25, "adaptive: share of the measured tokens the "
                           "held-out check counts as kept", unit, "0 < x < 1"),
    "adaptive_sink": Param(int, 4, "adaptive: first tokens left out of the held-out "
                           "check (the event keeps them anyway)", lambda v: v >= 0,
                           "a whole number >= 0"),
}


def build(cfg) -> AdaptiveSelect:
    """The candidates built by the registry's own factories (their arguments
    and defaults apply); ``temporal`` offline unless ``online`` is given."""
    from types import SimpleNamespace

    from vllm_kvshrink.methods import adaptive_candidates, build_method

    a = cfg.args
    given = getattr(cfg, "method_args", None) or {}
    names = parse_scorers(a["adaptive_scorers"], adaptive_candidates())
    sub_cfg = SimpleNamespace(method=None, pool_kernel=cfg.pool_kernel,
                              args={**a, "online": bool(given.get("online", False))})
    cands = []
    for n in names:
        sub_cfg.method = n
        cands.append((n, build_method(sub_cfg)))
    return AdaptiveSelect(cands, decay=a["adaptive_decay"], frac=a["adaptive_frac"],
                          sink=a["adaptive_sink"])
