"""MiniCache: merge the KV states of adjacent layers in the deeper half.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large
Language Models", NeurIPS 2024 (arXiv:2405.14366).  For each pair of layers
``(l, l+1)`` from ``start`` on, each token's key (and value) is split into a
norm and a direction; the two directions are interpolated (SLERP at t = 1/2,
i.e. the normalised sum) into one shared direction, and each layer keeps only
its norm.  Tokens whose two directions are too far apart (cosine below
``retain_cos``) are retained unmerged, as are the sinks and the recent window.

Not served by the engine: vLLM's paged cache gives every layer its own blocks
of one fixed size and its attention kernels read only those, so storing one
direction for two layers would free nothing there.  It runs in the research
path, which counts the bytes the merged representation holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_kvshrink.methods.params import Param


def slerp_merge(a: torch.Tensor, b: torch.Tensor, retain_cos: float):
    """Merged ``(a', b', merged_mask)`` for two layers' vectors ``[..., D]``."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    cos = (ua * ub).sum(-1)
    direction = F.normalize(ua + ub, dim=-1)
    merged = cos >= retain_cos
    m = merged[..., None]
    return torch.where(m, na * direction, a), torch.where(m, nb * direction, b), merged


class MiniCache:
    name = "minicache"
    #: merges across layers on its own schedule (see ScoringMethod.cross_layer)
    cross_layer = True
    paper = "Liu et al. 2024, arXiv:2405.14366"
    servable = False

    def __init__(self, start: float = 0.5, retain_cos: float = 0.0) -> None:
        if not 0.0 <= start < 1.0:
            raise ValueError(f"minicache_start={start!r}; allowed: 0 <= x < 1")
        if not -1.0 <= retain_cos <= 1.0:
            raise ValueError(f"minicache_retain_cos={retain_cos!r}; allowed: -1..1")
        self.start = start
        self.retain_cos = retain_cos

    def pairs(self, num_layers: int) -> list[tuple[int, int]]:
        first = int(self.start * num_layers)
        return [(i, i + 1) for i in range(first, num_layers - 1, 2)]

    def apply(self, keys: list[torch.Tensor], values: list[torch.Tensor],
              protect: torch.Tensor) -> list[torch.Tensor]:
        """Merge in place.  ``keys[l]``/``values[l]`` ``[H, N, D]``;
        ``protect`` ``[N]`` bool (sinks, recent window).  Returns per layer the
        ``[H, N]`` mask of tokens whose K and V are stored merged (the pair's
        second layer holds only norms for them)."""
        shared = [torch.zeros(keys[0].shape[:2], dtype=torch.bool) for _ in keys]
        for a, b in self.pairs(len(keys)):
            ka, kb, mk = slerp_merge(keys[a].float(), keys[b].float(), self.retain_cos)
            va, vb, mv = slerp_merge(values[a].float(), values[b].float(), self.retain_cos)
            m = mk & mv & ~protect[None, :]
            mm = m[..., None]
            keys[a].copy_(torch.where(mm, ka, keys[a].float()))
            keys[b].copy_(torch.where(mm, kb, keys[b].float()))
            values[a].copy_(torch.where(mm, va, values[a].float()))
            values[b].copy_(torch.where(mm, vb, values[b].float()))
            shared[b] = m
        return shared


#: minicache's parameters (gathered by the registry, :mod:`vllm_kvshrink.methods`).
PARAMS = {
    "minicache_start": Param(float, 0.5, "minicache: first merged layer, as a "
                             "fraction of depth", lambda v: 0 <= v < 1, "0 <= x < 1",
                             research_only=True),
    "minicache_retain_cos": Param(float, 0.0, "minicache: tokens whose two layers' "
                                  "directions have a lower cosine stay unmerged",
                                  lambda v: -1 <= v <= 1, "-1 <= x <= 1",
                                  research_only=True),
}
