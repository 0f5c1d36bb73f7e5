"""SnapKV: attention of an observation window of recent queries, pooled.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
NeurIPS 2024 (arXiv:2404.14469).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_kvshrink.methods.base import ScoringMethod
from vllm_kvshrink.policy.softmax import window_probs


def window_attention(
    keys: torch.Tensor,
    queries: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each window query over the cached keys.

    Args:
        keys: ``[Hkv, N, D]``; queries: ``[Hq, W, D]`` with ``Hq % Hkv == 0``;
        query_pos: ``[W]``, query ``w`` attends keys ``0..query_pos[w]``.

    Returns:
        ``[Hkv, Hq // Hkv, W, N]`` float32 probabilities: one layer of
        :func:`~vllm_kvshrink.policy.softmax.window_probs`.
    """
    scale = keys.shape[-1] ** -0.5 if scale is None else scale
    scales = torch.tensor([scale], dtype=torch.float32, device=keys.device)
    return window_probs(queries[None], keys[None], query_pos, scales)[0]


class SnapKV(ScoringMethod):
    name = "snapkv"
    needs_queries = True
    paper = "Li et al. 2024, arXiv:2404.14469"

    def __init__(self, pool_kernel: int = 7) -> None:
        if pool_kernel < 1 or pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel={pool_kernel}; allowed: odd >= 1")
        self.pool_kernel = pool_kernel

    def score(self, keys, queries=None, query_pos=None, scale=None):
        if queries is None or queries.shape[1] == 0:
            raise ValueError("snapkv needs an observation window of queries")
        probs = window_attention(keys, queries, query_pos, scale)
        # Sum over the window, mean over the query heads sharing a KV head.
        scores = probs.sum(dim=2).mean(dim=1)  # [Hkv, N]
        if self.pool_kernel > 1:
            scores = F.avg_pool1d(
                scores[:, None, :],
                self.pool_kernel,
                stride=1,
                padding=self.pool_kernel // 2,
                count_include_pad=False,
            )[:, 0, :]
        return scores
