"""Exponential moving average of received attention -- the temporal
predictor's simple twin.

Each observed query updates a token's score ``s <- decay * s + (1 - decay) * a``
where ``a`` is the attention the query gives the token (mean over the GQA
group).  Like H2O it sees every query once; unlike H2O it forgets.  Moving
averages of attention as an importance signal go back at least to
Scissorhands (Liu et al. 2023, arXiv:2305.17118).
"""

from __future__ import annotations

import torch

from vllm_kvshrink.methods.base import ScoringMethod, extend_state
from vllm_kvshrink.methods.h2o import new_query_mask
from vllm_kvshrink.methods.params import Param, unit


def ema_update(prev: torch.Tensor, attn: torch.Tensor, decay: float) -> torch.Tensor:
    """Fold the queries of ``attn`` ``[L, H, m, N]`` (oldest first) into
    ``prev`` ``[L, H, N]``."""
    m = attn.shape[2]
    if m == 0:
        return prev
    w = (1.0 - decay) * decay ** torch.arange(m - 1, -1, -1, dtype=torch.float32)
    return prev * decay**m + torch.einsum("lhmn,m->lhn", attn, w)


class EMAAttention(ScoringMethod):
    name = "ema"
    needs_queries = True
    stateful = True
    paper = "moving average of attention (cf. Liu et al. 2023, arXiv:2305.17118)"

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r}; allowed: 0 < ema_decay < 1")
        self.decay = decay

    def score_layers(self, obs, state):
        l, h, n = obs.keys.shape[:3]
        attn = obs.attention()
        new = new_query_mask(obs, state)
        prev = extend_state(state.get("ema"), n, lh=(l, h))
        state["_ema"] = ema_update(prev, attn[:, :, new], self.decay)
        return state["_ema"]

    def update(self, state, keep):
        state["ema"] = state.pop("_ema").gather(2, keep)
        state["n"] = keep.shape[2]


#: ema's parameters (gathered by the registry, :mod:`vllm_kvshrink.methods`).
PARAMS = {
    "ema_decay": Param(float, 0.9, "ema: weight of the past per observed query", unit,
                       "0 < x < 1"),
}
