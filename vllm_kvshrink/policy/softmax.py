"""The observation window's attention over the cached keys.

SnapKV, H2O, TOVA and the tier policy's distortion measure all start from the
same quantity: each window query's softmax attention over the cached keys of
its own layer, causal by the query's index in the cache.  One function
computes it, so every scorer sees the same probabilities on both paths.
"""

from __future__ import annotations

import torch


def window_probs(queries: torch.Tensor, keys: torch.Tensor, query_pos: torch.Tensor,
                 scales: torch.Tensor, key_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``[L, Hkv, G, W, N]`` float32 softmax attention of each window query
    (``G = Hq // Hkv`` query heads per KV head) over the cached keys.

    Args:
        queries: ``[L, Hq, W, D]``, oldest first (any float dtype).
        keys: ``[L, Hkv, N, D]`` cached keys after RoPE, cache order.
        query_pos: ``[W]`` index in the cache of each query's token: query
            ``w`` attends keys ``0..query_pos[w]``.
        scales: ``[L]`` (or broadcastable to ``[L, 1, 1, 1, 1]``) softmax
            scale per layer.
        key_mask: optional bool ``[L, Hkv, N]`` (or broadcastable to
            ``[L, Hkv, 1, 1, N]`` after adding those axes), the keys that
            exist; the others get no attention.

    Raises ``ValueError`` if ``Hq`` is not a multiple of ``Hkv``.
    """
    l, hkv, n, d = keys.shape
    hq, w = queries.shape[1:3]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    q = queries.to(torch.float32).view(l, hkv, hq // hkv, w, d)
    logits = torch.einsum("lhgwd,lhnd->lhgwn", q, keys.to(torch.float32))
    logits *= scales.view(l, 1, 1, 1, 1) if scales.dim() == 1 else scales
    visible = torch.arange(n, device=keys.device)[None, :] <= query_pos[:, None]
    logits.masked_fill_(~visible, float("-inf"))
    if key_mask is not None:
        logits.masked_fill_(~key_mask[:, :, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)
