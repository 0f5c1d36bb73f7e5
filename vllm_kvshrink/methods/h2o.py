"""H2O: heavy hitters by accumulated attention, plus the recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models", NeurIPS 2023 (arXiv:2306.14048).

Each token's score is the attention it has received, summed over every query
observed since the request started (averaged over the query heads that share
its KV head).  Queries are observed in windows: at each compression event the
last ``OBS_WINDOW`` queries; each query is counted once (only those newer than
the previous event).  With ``SLACK_TOKENS <= OBS_WINDOW`` that is every
generated token's query; of the prompt, the last ``OBS_WINDOW`` queries are
observed (the paper's full prefill column sums cost O(N^2) and are not
captured by the engine).
"""

from __future__ import annotations

import torch

from vllm_kvshrink.methods.base import Observation, ScoringMethod, extend_state


def new_query_mask(obs: Observation, state: dict) -> torch.Tensor:
    """``[W]`` bool: window queries not observed at an earlier event (their
    tokens sit past the ``n`` tokens the cache held after that event)."""
    return obs.query_pos >= state.get("n", 0)


class H2O(ScoringMethod):
    name = "h2o"
    needs_queries = True
    stateful = True
    paper = "Zhang et al. 2023, arXiv:2306.14048"

    def score_layers(self, obs, state):
        l, h, n = obs.keys.shape[:3]
        attn = obs.attention()  # [L, H, W, N]
        new = new_query_mask(obs, state)
        acc = extend_state(state.get("acc"), n, lh=(l, h))
        acc = acc + attn[:, :, new].sum(dim=2)
        state["_acc"] = acc
        return acc

    def update(self, state, keep):
        state["acc"] = state.pop("_acc").gather(2, keep)
        state["n"] = keep.shape[2]
