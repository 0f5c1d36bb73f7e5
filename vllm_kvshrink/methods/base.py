"""The interface every importance method implements.

A method sees tensors only -- never the engine, never transformers -- so the
same object makes the same decisions wherever it runs.  It implements one verb,
:meth:`ScoringMethod.score`; :func:`select_keep` owns the top-k, the sinks and
the recent window.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class ScoringMethod:
    """Scores the cached tokens of one layer of one request.

    Subclasses set :attr:`name` and :attr:`needs_queries` and implement
    :meth:`score`.  Higher score = more worth keeping.
    """

    name: ClassVar[str] = ""
    #: Whether :meth:`score` needs the observation window of recent queries.
    needs_queries: ClassVar[bool] = False
    #: Paper the method comes from, for the README and reports.
    paper: ClassVar[str] = ""

    def score(
        self,
        keys: torch.Tensor,
        queries: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Return per-token scores.

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
