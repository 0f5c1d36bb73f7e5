"""Taking tokens out of a ``[L, H, N, D]`` tensor by per-row index.

``x.gather(2, idx[..., None].expand(-1, -1, -1, D))`` reads one int64 index
per element; a tier event takes every token of a request this way several
times (into cache order, then each level's tokens), and the element-wise
gather was the largest single cost of reading a request's cache.  The same
selection as whole rows of ``D`` elements (one index per token) is a plain
row copy, bit for bit the same values, several times faster.
"""

from __future__ import annotations

import torch


def take_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[l, h, idx[l, h, k], :]`` for every ``(l, h, k)``: ``[L, H, K, D]``
    from ``x`` ``[L, H, N, D]`` and ``idx`` ``[L, H, K]`` (int64, each in
    ``[0, N)``); what ``x.gather(2, idx[..., None].expand(..., D))`` gives."""
    l, h, n, d = x.shape
    k = idx.shape[-1]
    if idx.shape[:2] != (l, h):
        raise ValueError(f"idx {tuple(idx.shape)} must be [L, H, K] for x {tuple(x.shape)}")
    if k and (int(idx.min()) < 0 or int(idx.max()) >= n):  # else a row reads its neighbour
        raise IndexError(f"token index out of [0, {n}): {int(idx.min())}..{int(idx.max())}")
    rows = torch.arange(l * h, dtype=torch.int64).view(l, h, 1) * n
    flat = (rows + idx.to(torch.int64)).reshape(-1)
    return x.reshape(l * h * n, d).index_select(0, flat).view(l, h, k, d)
