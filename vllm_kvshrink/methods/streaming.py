"""StreamingLLM: attention sinks plus the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024 (arXiv:2309.17453).
"""

from __future__ import annotations

import torch

from vllm_kvshrink.methods.base import ScoringMethod


class StreamingLLM(ScoringMethod):
    name = "streaming"
    position_only = True
    paper = "Xiao et al. 2024, arXiv:2309.17453"

    def score(self, keys, queries=None, query_pos=None, scale=None):
        heads, n, _ = keys.shape
        # Newer tokens score higher; sinks are forced in by select_keep.
        return torch.arange(n, dtype=torch.float32, device=keys.device).expand(heads, n)
