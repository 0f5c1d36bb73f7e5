"""Per-head and per-layer budgets (research path).

* ``adaptive`` -- AdaKV (Feng et al. 2024, arXiv:2407.11550): within a layer,
  the heads' budgets come from one top-k over the scores of all its heads,
  so heads with concentrated attention give slots to heads with spread-out
  attention; each head keeps at least its sinks and recent window.
* ``pyramid`` -- PyramidKV (Cai et al. 2024, arXiv:2406.02069): budgets fall
  linearly with depth (1.5x the mean in the first layer to 0.5x in the last).

The engine serves ``uniform`` only: vLLM gives a request one block table and
one ``seq_lens`` entry shared by every layer and KV head, so every (layer,
head) must hold the same number of tokens.  Which tokens stay already differs
per layer and head there.
"""

from __future__ import annotations

import torch

from vllm_kvshrink.methods.params import Param

MODES = ("uniform", "adaptive", "pyramid")


def head_budgets(scores: torch.Tensor, num_keep: int, floor: int, mode: str) -> torch.Tensor:
    """``[L, H]`` tokens each (layer, head) keeps; the total is ``L*H*num_keep``
    up to rounding.  ``scores`` ``[L, H, N]`` with forced tokens at +inf."""
    l, h, n = scores.shape
    floor = min(floor, n)
    if mode == "uniform" or num_keep >= n:
        return torch.full((l, h), min(num_keep, n), dtype=torch.int64)
    if mode == "pyramid":
        frac = 1.5 - torch.arange(l, dtype=torch.float32) / max(l - 1, 1)
        per_layer = (frac * num_keep).round().to(torch.int64).clamp(floor, n)
        return per_layer[:, None].expand(l, h).clone()
    if mode == "adaptive":
        s = scores.to(torch.float32).nan_to_num(nan=float("-inf"))
        free = s.masked_fill(torch.isinf(s) & (s > 0), float("-inf"))
        extra = h * (num_keep - floor)
        counts = torch.full((l, h), floor, dtype=torch.int64)
        if extra > 0:
            top = torch.topk(free.reshape(l, h * n), min(extra, h * n), dim=-1).indices
            counts += torch.zeros(l, h * n, dtype=torch.int64).scatter_(
                1, top, 1).view(l, h, n).sum(-1)
        return counts.clamp(max=n)
    raise ValueError(f"head_budget={mode!r}; allowed: {', '.join(MODES)}")


#: Framework parameter of every method (gathered by the registry,
#: :mod:`vllm_kvshrink.methods`).
PARAMS = {
    "head_budget": Param(str, "uniform", "per-head (adaptive, AdaKV) or per-layer "
                         "(pyramid, PyramidKV) budgets; the engine serves uniform only",
                         lambda v: v in MODES, " | ".join(MODES), research_only=True),
}
