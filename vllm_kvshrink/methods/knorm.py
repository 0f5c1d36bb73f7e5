"""Key-norm: keep the tokens whose keys have the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024 (arXiv:2406.11430): low-norm keys tend to draw high
attention, so no queries are needed.
"""

from __future__ import annotations

import torch

from vllm_kvshrink.methods.base import ScoringMethod


class KeyNorm(ScoringMethod):
    name = "knorm"
    paper = "Devoto et al. 2024, arXiv:2406.11430"

    def score(self, keys, queries=None, query_pos=None, scale=None):
        return -keys.to(torch.float32).norm(dim=-1)
