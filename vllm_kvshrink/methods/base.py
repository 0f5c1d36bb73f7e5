"""The interface every importance method implements.

A method sees tensors only -- never the engine, never transformers -- so the
same object makes the same decisions wherever it runs.  The engine's worker and
the transformers research path (:mod:`vllm_kvshrink.lab.hf.research`) both call
:func:`compress_event` with the same tensors:

* :class:`Observation` -- the cached keys of every layer of one request, the
  queries of its observation window and (lazily) their attention;
* a per-request ``state`` dict the method may keep between events (H2O's
  accumulated attention, the temporal predictor's features, merge counts), in
  cache order; :meth:`ScoringMethod.update` gathers it after each selection.

:func:`select_keep` owns the top-k, the sinks and the recent window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from vllm_kvshrink.policy.heads import LOCAL, HeadGroup
from vllm_kvshrink.policy.softmax import window_probs


@dataclass
class Observation:
    """What a method may look at during one compression event of one request.

    Attributes:
        keys: ``[L, Hkv, N, D]`` cached keys (after RoPE), cache order.
        queries: ``[L, Hq, W, D]`` the most recent queries, oldest first, or
            ``None`` for query-free methods.
        query_pos: ``[W]`` physical index in the cache of the token each query
            belongs to (a query sees keys ``<=`` its index).
        scales: per-layer softmax scale.
        values: ``[L, Hkv, N, D]`` cached values, or a zero-argument callable
            returning them (read once, on the first :meth:`value_tensor`).
            :func:`compress_event` fills it from its ``values`` argument, so a
            method reads the values only if it asks for them.
        rope_inv_freq: optional ``[R]`` (or per layer ``[L, R]``) RoPE angular
            frequencies in radians per position, rotate-half (GPT-NeoX / HF
            Llama) layout over the first ``2R`` dims of each head, as
            ``model.model.rotary_emb.inv_freq``; ``None`` = unknown.  Only
            methods that extrapolate queries to future positions read it.
        key_mask: optional ``[L, Hkv, N]`` bool, the tokens that exist (the
            research path's promotion view spans every logical position, and
            tokens neither resident nor offloaded are gone): :meth:`probs`
            gives the others no attention.  Scorers that read the keys
            directly see zeros there; the tier policy never picks them.
        heads: the KV heads a reduction over heads must span
            (:class:`~vllm_kvshrink.policy.heads.HeadGroup`): under tensor
            parallelism this observation holds one rank's heads, and a method
            that reduces over heads gathers the others first.
    """

    keys: torch.Tensor
    queries: torch.Tensor | None = None
    query_pos: torch.Tensor | None = None
    scales: Sequence[float] | None = None
    values: Any = None
    rope_inv_freq: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    heads: HeadGroup = LOCAL
    _probs: torch.Tensor | None = field(default=None, repr=False)
    _attn: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    def scale_tensor(self) -> torch.Tensor:
        d = self.keys.shape[-1]
        s = [d**-0.5] * self.num_layers if self.scales is None else list(self.scales)
        return torch.tensor(s, dtype=torch.float32)

    def value_tensor(self) -> torch.Tensor:
        """``[L, Hkv, N, D]`` cached values (read on first use)."""
        if callable(self.values):
            self.values = self.values()
        if self.values is None:
            raise ValueError("this method needs the cached values")
        return self.values

    def probs(self) -> torch.Tensor:
        """``[L, Hkv, G, W, N]`` float32 softmax attention of each window query
        (``G`` query heads per KV head), causal by :attr:`query_pos`
        (:func:`~vllm_kvshrink.policy.softmax.window_probs`)."""
        if self._probs is None:
            if self.queries is None or self.queries.shape[2] == 0:
                raise ValueError("this method needs an observation window of queries")
            self._probs = window_probs(self.queries, self.keys, self.query_pos,
                                       self.scale_tensor(), self.key_mask)
        return self._probs

    def attention(self) -> torch.Tensor:
        """``[L, Hkv, W, N]``: :meth:`probs` averaged over each GQA group
        (computed once: the importance method and the merger both read it)."""
        if self._attn is None:
            self._attn = self.probs().mean(dim=2)
        return self._attn


class ScoringMethod:
    """Scores the cached tokens of one request.

    Subclasses set :attr:`name` and :attr:`needs_queries` and implement either
    :meth:`score` (one layer; heads scored independently) or
    :meth:`score_layers` (all layers at once, with per-request state).  Higher
    score = more worth keeping.
    """

    name: ClassVar[str] = ""
    #: Whether scoring needs the observation window of recent queries.
    needs_queries: ClassVar[bool] = False
    #: Paper the method comes from, for the README and reports.
    paper: ClassVar[str] = ""
    #: Keeps state between events of a request (see :meth:`update`).
    stateful: ClassVar[bool] = False
    #: Rewrites kept tokens' K/V (merging) instead of only choosing them.
    merges: ClassVar[bool] = False
    #: Scores from positions alone (``score`` ignores the keys' values): the
    #: engine skips reading the cache and uses one selection for all layers.
    position_only: ClassVar[bool] = False
    #: Merges K/V across layers on its own schedule (``apply``) instead of
    #: choosing tokens at compression events: research path only.
    cross_layer: ClassVar[bool] = False

    def score(
        self,
        keys: torch.Tensor,
        queries: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Per-token scores of one layer.

        Args:
            keys: ``[num_kv_heads, num_tokens, head_dim]`` cached keys (after RoPE),
                in cache order (oldest first).
            queries: ``[num_q_heads, window, head_dim]`` the most recent queries
                of this layer, oldest first, or ``None``.
            query_pos: ``[window]`` index into ``keys`` of the token each query
                belongs to (the query attends to keys ``<=`` that index).
            scale: softmax scale of the layer (default ``head_dim ** -0.5``).

        Returns:
            ``[num_kv_heads, num_tokens]`` float32 scores.
        """
        raise NotImplementedError

    def score_layers(self, obs: Observation, state: dict[str, Any]) -> torch.Tensor:
        """``[L, Hkv, N]`` scores of every layer.  The default flattens layers
        into the head axis (one batched call) when the scales agree."""
        keys, q = obs.keys, obs.queries
        l, h, n, d = keys.shape
        scales = obs.scale_tensor().tolist()
        if len(set(scales)) == 1:
            flat_q = None if q is None else q.reshape(-1, *q.shape[2:])
            return self.score(keys.reshape(-1, n, d), flat_q, obs.query_pos,
                              scales[0]).view(l, h, n)
        return torch.stack([
            self.score(keys[i], None if q is None else q[i], obs.query_pos, scales[i])
            for i in range(l)])

    def update(self, state: dict[str, Any], keep: torch.Tensor) -> None:
        """After a selection (``keep`` ``[L, Hkv, K]``): carry the state of the
        kept tokens into their new cache order.  Stateless methods: no-op."""

    def merge(self, obs: Observation, values: torch.Tensor, scores: torch.Tensor,
              keep: torch.Tensor, state: dict[str, Any]):
        """Merging methods only: ``(keys, values)`` ``[L, Hkv, K, D]`` float32 to
        store in the kept slots."""
        raise NotImplementedError


def extend_state(t: torch.Tensor | None, n: int, fill: float = 0.0,
                 lh: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-token state ``[L, H, have, ...]`` padded (or cut) to ``n`` tokens;
    new tokens read ``fill``.  ``t=None``: a fresh ``[*lh, n]`` state."""
    if t is None:
        return torch.full(tuple(lh) + (n,), fill, dtype=torch.float32)
    have = t.shape[2]
    if have >= n:
        return t[:, :, :n]
    pad = t.new_full(t.shape[:2] + (n - have,) + t.shape[3:], fill)
    return torch.cat([t, pad], dim=2)


def select_keep(
    scores: torch.Tensor, num_keep: int, sink_tokens: int, recent_tokens: int
) -> torch.Tensor:
    """Indices of the tokens to keep, per KV head.

    The first ``sink_tokens`` and the last ``recent_tokens`` tokens are always
    kept; the rest of the budget goes to the highest scores.

    Args:
        scores: ``[num_kv_heads, num_tokens]``.
        num_keep: tokens to keep per head (``<= num_tokens``).

    Returns:
        ``[num_kv_heads, num_keep]`` int64 indices, ascending in each row.
    """
    heads, n = scores.shape
    if num_keep >= n:
        return torch.arange(n, device=scores.device).expand(heads, n).clone()
    if num_keep < min(n, sink_tokens + recent_tokens):
        raise ValueError(
            f"num_keep={num_keep} is smaller than sink_tokens + recent_tokens "
            f"= {sink_tokens + recent_tokens}"
        )
    s = scores.to(torch.float32).clone()
    s.nan_to_num_(nan=float("-inf"))
    if sink_tokens:
        s[:, :sink_tokens] = float("inf")
    if recent_tokens:
        s[:, max(0, n - recent_tokens) :] = float("inf")
    idx = torch.topk(s, num_keep, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values


@dataclass
class EventResult:
    keep: torch.Tensor  # [L, Hkv, K] ascending physical indices
    keys: torch.Tensor | None = None  # [L, Hkv, K, D] merged keys (merging methods)
    values: torch.Tensor | None = None
    merged: int = 0  # evicted tokens folded into kept ones
    scores: torch.Tensor | None = field(default=None, repr=False)
    #: [L, Hkv, K] bool, research path with per-head budgets: kept slots a
    #: (layer, head) may attend; ``None`` = all.
    visible: torch.Tensor | None = None


def score_event(method: ScoringMethod, obs: Observation, state: dict[str, Any],
                values=None) -> torch.Tensor:
    """``[L, Hkv, N]`` scores of one event, checked; ``values`` (a tensor or a
    callable) becomes :attr:`Observation.values` unless it is set already.
    Every event calls this: eviction (:func:`compress_event`) and tiers."""
    l, h, n = obs.keys.shape[:3]
    if obs.values is None:
        obs.values = values
    scores = method.score_layers(obs, state)
    if scores.shape != (l, h, n) or not torch.isfinite(scores).any():
        raise RuntimeError(f"method {method.name!r} returned bad scores "
                           f"{tuple(scores.shape)}, expected {(l, h, n)}")
    return scores


def compress_event(
    method: ScoringMethod,
    obs: Observation,
    state: dict[str, Any],
    num_keep: int,
    sink_tokens: int,
    recent_tokens: int,
    values=None,
    hidden: torch.Tensor | None = None,
    budget_mode: str = "uniform",
) -> EventResult:
    """One compression event of one request: score, select, (merge), update
    state.  The engine and the research path both call exactly this.

    ``values`` (``[L, Hkv, N, D]`` or a callable returning it) is read only by
    merging methods and by methods that call :meth:`Observation.value_tensor`
    (at most once).  Research path only: ``hidden`` ``[L, Hkv, N]`` marks
    slots a per-head budget already hid (dropped first), and ``budget_mode``
    other than ``"uniform"`` gives (layer, head)s different counts
    (:mod:`~vllm_kvshrink.methods.budgets`): ``num_keep`` becomes the mean, the
    largest count is kept and :attr:`EventResult.visible` hides the rest.
    """
    l, h, n = obs.keys.shape[:3]
    scores = score_event(method, obs, state, values)
    ranked = scores
    if hidden is not None:
        ranked = scores.masked_fill(hidden, float("-inf"))
    counts = None
    if budget_mode != "uniform":
        from vllm_kvshrink.methods.budgets import head_budgets

        forced = ranked.to(torch.float32).clone()
        forced[:, :, :sink_tokens] = float("inf")
        forced[:, :, max(0, n - recent_tokens):] = float("inf")
        counts = head_budgets(forced, num_keep, min(n, sink_tokens + recent_tokens),
                              budget_mode)
        num_keep = int(counts.max())
    keep = select_keep(ranked.reshape(l * h, n), num_keep, sink_tokens,
                       recent_tokens).view(l, h, -1)
    result = EventResult(keep=keep, scores=scores)
    if counts is not None:
        s = ranked.to(torch.float32).gather(2, keep)
        pos = keep.to(torch.float32)
        s = torch.where((pos < sink_tokens) | (pos >= n - recent_tokens),
                        float("inf"), s)
        order = s.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        result.visible = order < counts[..., None]
    if method.merges:
        vals = None if obs.values is None else obs.value_tensor()
        result.keys, result.values, result.merged = method.merge(obs, vals, scores, keep,
                                                                 state)
    method.update(state, keep)
    return result
