"""TOVA: keep the tokens the newest query attends to most.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024
(arXiv:2401.06104).  The score of a token is the attention of the most recent
query, averaged over all heads of the layer, so every head of a layer keeps
the same tokens.  The paper drops one token per step; here the lowest-scoring
tokens are dropped together at each compression event.
"""

from __future__ import annotations

from vllm_kvshrink.methods.base import ScoringMethod


class TOVA(ScoringMethod):
    name = "tova"
    needs_queries = True
    paper = "Oren et al. 2024, arXiv:2401.06104"

    def score_layers(self, obs, state):
        l, h, n = obs.keys.shape[:3]
        newest = int(obs.query_pos.argmax())
        p = obs.probs()[:, :, :, newest]  # [L, H, G, N]
        # every KV head of the layer, those of other tensor-parallel ranks too
        p = obs.heads.gather(p, 1)
        return p.mean(dim=(1, 2))[:, None, :].expand(l, h, n).contiguous()
