"""Expected Attention: the attention future queries are expected to pay.

Devoto et al., "Expected Attention: KV Cache Compression by Estimating
Attention from Future Queries Distribution", 2025 (arXiv:2510.00636); NVIDIA
kvpress's ``ExpectedAttentionPress``.

Future queries are modelled as a Gaussian ``q ~ N(mu, Sigma)`` fitted to the
observed ones.  For a Gaussian, ``E[exp(s q.k)] = exp(s mu.k + s^2/2 k'Sigma k)``,
so a token's expected (unnormalised) attention is that exponential; softmax
over the tokens, mean over the GQA group, times ``||v||``.

What the queries are, per layer and query head:

* the observation window's queries (post-RoPE, ``Observation.queries``),
  minus any that belong to the first ``n_sink`` tokens;
* with RoPE frequencies known (``Observation.rope_inv_freq``, else
  ``rope_theta``): each query is first rotated forward by its distance to the
  newest cached token, ``R(N-1-query_pos)``.  Rotations compose, so this equals
  ``R(t) q_pre`` (``t`` = the newest token's position, ``q_pre`` the pre-RoPE
  query) without knowing absolute positions -- the physical indices of a
  compacted cache suffice, since the window's tokens are never evicted.  Mean
  and covariance are taken of those, and the average rotation over the next
  ``n_future`` positions, ``Rbar = mean_{j=1..F} R(j)``, is applied:
  ``mu <- Rbar mu``, ``Sigma <- Rbar Sigma Rbar'``.  Because
  ``mean_j R(t+j) = Rbar R(t)``, this is exactly kvpress's average rotation
  over the absolute positions ``t+1 .. t+F`` applied to the pre-RoPE
  statistics of the same queries;
* without RoPE frequencies: the post-RoPE window statistics as they are (no
  extrapolation to future positions).

The covariance is never built when the window is smaller than the head dim:
``k'Sigma k = mean_w ((q_w - mu).k)^2``.

Differences from kvpress: the statistics come from the last ``OBS_WINDOW``
queries of the request, not from every prompt token past ``n_sink`` (kvpress
scores once, after prefill); the logit scale is the layer's softmax scale
(kvpress: ``1/sqrt(head_dim)``, the same for Llama-like models); without RoPE
frequencies there is no future rotation at all (see above).
"""

from __future__ import annotations

import torch

from vllm_kvshrink.methods.base import ScoringMethod
from vllm_kvshrink.methods.params import Param


def rope_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    """``[head_dim // 2]`` default (unscaled) RoPE frequencies
    ``theta ** (-2i / head_dim)``, as Hugging Face's ``rotary_emb.inv_freq``."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply ``cos * I + sin * P`` (``P x = rotate_half(x)``) to the first
    ``2 * cos.shape[-1]`` dims of ``x``; the rest pass unchanged.  ``cos`` and
    ``sin`` broadcast against ``x[..., :r]``."""
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def query_statistics(
    queries: torch.Tensor,
    query_pos: torch.Tensor,
    num_tokens: int,
    inv_freq: torch.Tensor | None = None,
    n_future: int = 512,
    n_sink: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[Hq, D]`` and centred samples ``[Hq, W', D]`` (``Sigma = c'c / W'``)
    of the future-query Gaussian, all float32.

    Args:
        queries: ``[Hq, W, D]`` post-RoPE window queries.
        query_pos: ``[W]`` their physical cache indices (newest token: ``num_tokens - 1``).
        inv_freq: ``[R]`` RoPE frequencies (rotate-half layout, ``2R <= D``) or
            ``None`` (statistics of the post-RoPE queries as they are).
    """
    q = queries.to(torch.float32)
    if inv_freq is not None and 2 * inv_freq.shape[-1] > q.shape[-1]:
        raise ValueError(f"{inv_freq.shape[-1]} RoPE frequencies need head dim >= "
                         f"{2 * inv_freq.shape[-1]}, got {q.shape[-1]}")
    query_pos = query_pos.to(q.device)
    keep = query_pos >= n_sink
    if bool(keep.any()) and not bool(keep.all()):
        q, query_pos = q[:, keep], query_pos[keep]
    if inv_freq is not None:
        f = inv_freq.to(device=q.device, dtype=torch.float64)
        ahead = (num_tokens - 1 - query_pos).to(torch.float64)
        ang = ahead[:, None] * f[None, :]  # [W, R]
        q = _rotate(q, ang.cos().float(), ang.sin().float())
    mu = q.mean(dim=1)
    centred = q - mu[:, None]
    if inv_freq is not None:
        j = torch.arange(1, n_future + 1, device=q.device, dtype=torch.float64)
        ang = j[:, None] * f[None, :]  # [F, R]
        cbar, sbar = ang.cos().mean(0).float(), ang.sin().mean(0).float()
        mu, centred = _rotate(mu, cbar, sbar), _rotate(centred, cbar, sbar)
    return mu, centred


def expected_attention_scores(
    keys: torch.Tensor,
    queries: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float | None = None,
    values: torch.Tensor | None = None,
    *,
    use_cov: bool = True,
    epsilon: float = 0.0,
    n_future: int = 512,
    n_sink: int = 4,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[Hkv, N]`` float32 Expected Attention scores of one layer.

    ``keys`` ``[Hkv, N, D]`` post-RoPE; ``queries`` ``[Hq, W, D]`` post-RoPE;
    ``values`` ``[Hkv, N, D]`` or ``None`` (no value-norm rescaling).  The first
    ``n_sink`` tokens leave the softmax and score the layer's maximum + 1.
    """
    hkv, n, d = keys.shape
    hq, w, _ = queries.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    g = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    sink = min(n_sink, n)
    if sink == n:  # nothing but sinks
        return torch.ones(hkv, n, dtype=torch.float32, device=keys.device)
    mu, c = query_statistics(queries, query_pos, n, inv_freq, n_future, n_sink)
    k = keys.to(torch.float32)
    mu = mu.view(hkv, g, d)
    logits = torch.einsum("hgd,hnd->hgn", mu, k) * scale
    if use_cov:
        wn = c.shape[1]
        c = c.view(hkv, g, wn, d)
        if wn <= d:  # low rank: k' Sigma k = mean_w (c_w . k)^2
            quad = torch.einsum("hgwd,hnd->hgwn", c, k).square_().mean(dim=2)
        else:
            cov = torch.einsum("hgwd,hgwe->hgde", c, c) / wn
            quad = torch.einsum("hnd,hgde,hne->hgn", k, cov, k)
        logits += 0.5 * scale * scale * quad
    logits[..., :sink] = float("-inf")
    scores = torch.softmax(logits, dim=-1).mean(dim=1)  # [Hkv, N]
    if values is not None:
        scores = (scores + epsilon) * values.to(torch.float32).norm(dim=-1)
    if sink:
        scores[:, :sink] = scores[:, sink:].max() + 1
    return scores


class ExpectedAttention(ScoringMethod):
    """Arguments (kvpress's names in brackets): ``use_cov``
    [``use_covariance``], ``vnorm`` [``use_vnorm``], ``epsilon``, ``n_future``
    [``n_future_positions``], ``n_sink``, and ``rope_theta`` (``0`` = only the
    Observation's ``rope_inv_freq``; kvpress reads the model's rotary module)."""

    name = "expected_attention"
    needs_queries = True
    paper = "Devoto et al. 2025, arXiv:2510.00636 (kvpress ExpectedAttentionPress)"

    def __init__(self, use_cov: bool = True, vnorm: bool = True, epsilon: float = 0.0,
                 n_future: int = 512, n_sink: int = 4, rope_theta: float = 0.0) -> None:
        if epsilon < 0:
            raise ValueError(f"ea_epsilon={epsilon!r}; allowed: >= 0")
        if n_future < 1:
            raise ValueError(f"ea_future={n_future!r}; allowed: >= 1")
        if n_sink < 0:
            raise ValueError(f"ea_sink={n_sink!r}; allowed: >= 0")
        if rope_theta != 0 and rope_theta <= 1:
            raise ValueError(f"ea_rope_theta={rope_theta!r}; allowed: 0 (off) or > 1")
        self.use_cov, self.vnorm, self.epsilon = use_cov, vnorm, epsilon
        self.n_future, self.n_sink, self.rope_theta = n_future, n_sink, rope_theta

    def _inv_freq(self, obs, layer: int) -> torch.Tensor | None:
        f = obs.rope_inv_freq
        if f is not None:
            return f[layer] if f.dim() == 2 else f
        if self.rope_theta:
            return rope_frequencies(self.rope_theta, obs.keys.shape[-1])
        return None

    def _layer(self, obs, layer, values):
        q = obs.queries
        if q is None or q.shape[2] == 0:
            raise ValueError("expected_attention needs an observation window of queries")
        scale = None if obs.scales is None else obs.scales[layer]
        return expected_attention_scores(
            obs.keys[layer], q[layer], obs.query_pos, scale,
            None if values is None else values[layer],
            use_cov=self.use_cov, epsilon=self.epsilon, n_future=self.n_future,
            n_sink=self.n_sink, inv_freq=self._inv_freq(obs, layer))

    def score_layers(self, obs, state):
        values = obs.value_tensor() if self.vnorm else None
        # One layer at a time: the low-rank term holds [Hq, W, N] floats.
        return torch.stack([self._layer(obs, i, values) for i in range(obs.num_layers)])

    def score(self, keys, queries=None, query_pos=None, scale=None):
        if self.vnorm:
            raise ValueError("expected_attention with ea_vnorm needs the values: "
                             "use score_layers / compress_event")
        if queries is None or queries.shape[1] == 0:
            raise ValueError("expected_attention needs an observation window of queries")
        return expected_attention_scores(
            keys, queries, query_pos, scale, use_cov=self.use_cov, epsilon=self.epsilon,
            n_future=self.n_future, n_sink=self.n_sink,
            inv_freq=None if not self.rope_theta
            else rope_frequencies(self.rope_theta, keys.shape[-1]))


#: expected_attention's parameters (gathered by the registry,
#: :mod:`vllm_kvshrink.methods`), kvpress's names in brackets in each doc.
PARAMS = {
    "ea_cov": Param(bool, True, "expected_attention: add the query covariance term "
                    "0.5 * scale^2 * k'Sigma k (kvpress use_covariance)"),
    "ea_vnorm": Param(bool, True, "expected_attention: multiply by the value norm "
                      "||v|| (kvpress use_vnorm)"),
    "ea_epsilon": Param(float, 0.0, "expected_attention: added to the expected "
                        "attention before the value-norm product (kvpress epsilon)",
                        lambda v: v >= 0, "x >= 0"),
    "ea_future": Param(int, 512, "expected_attention: future positions the RoPE "
                       "rotation is averaged over (kvpress n_future_positions)",
                       lambda v: v >= 1, "a whole number >= 1"),
    "ea_sink": Param(int, 4, "expected_attention: first tokens left out of the query "
                     "statistics and the softmax, always kept (kvpress n_sink)",
                     lambda v: v >= 0, "a whole number >= 0"),
    "ea_rope_theta": Param(float, 0.0, "expected_attention: RoPE base of the model "
                           "(plain RoPE over the whole head), used when the caller gives "
                           "no RoPE frequencies (0 = none: window statistics without "
                           "future rotation)",
                           lambda v: v == 0 or v > 1, "0 or x > 1"),
}


def build(cfg) -> ExpectedAttention:
    """The method from resolved arguments ``cfg.args``."""
    a = cfg.args
    return ExpectedAttention(use_cov=a["ea_cov"], vnorm=a["ea_vnorm"],
                             epsilon=a["ea_epsilon"], n_future=a["ea_future"],
                             n_sink=a["ea_sink"], rope_theta=a["ea_rope_theta"])
