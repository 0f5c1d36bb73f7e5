"""Tests of the Expected Attention method (arXiv:2510.00636, kvpress's
ExpectedAttentionPress), against references written out here:

* a float64 port of kvpress's formula in kvpress's own frame (pre-RoPE query
  statistics, explicit averaged rotation matrices ``cos I + sin P`` over the
  next ``F`` absolute positions), on an uncompacted and a compacted cache;
* with ``Sigma = 0`` the score is the attention of the mean query;
* Monte Carlo: ``exp(s mu.k + s^2/2 k'Sigma k) = E[exp(s q.k)]`` for Gaussian q;
* a real model (SmolLM2): kvpress's formula on the model's own pre-RoPE
  queries and rotary module equals ours on its post-RoPE queries.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvshrink.config import KVShrinkConfig, KVShrinkConfigError
from vllm_kvshrink.methods import (
    Observation,
    available_methods,
    build_method,
    compress_event,
    describe_methods,
    parse_method,
    resolve_args,
)
from vllm_kvshrink.methods.expected_attention import (
    ExpectedAttention,
    expected_attention_scores,
    rope_frequencies,
)
from vllm_kvshrink.methods.snapkv import window_attention


# ----------------------------------------------------------------- references
def rope_matrix(pos: float, freqs: torch.Tensor, d: int) -> torch.Tensor:
    """``[d, d]`` float64 RoPE rotation at ``pos`` built as kvpress does:
    ``cos * I + sin * P`` with ``P = [[0, -I], [I, 0]]`` on the first ``2R``
    dims (partial rotary: identity on the rest)."""
    r = freqs.shape[0]
    m = torch.eye(d, dtype=torch.float64)
    ang = pos * freqs.double()
    c, s = torch.cos(ang), torch.sin(ang)
    for i in range(r):
        m[i, i] = c[i]
        m[r + i, r + i] = c[i]
        m[i, r + i] = -s[i]
        m[r + i, i] = s[i]
    return m


def apply_rope(x: torch.Tensor, positions, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` ``[H, T, D]`` rotated per token by its position (float64)."""
    d = x.shape[-1]
    out = torch.empty_like(x, dtype=torch.float64)
    for t, p in enumerate(positions):
        out[:, t] = x[:, t].double() @ rope_matrix(float(p), freqs, d).T
    return out


def ref_kvpress(pre_q, pre_k, k_pos, values, freqs, now, *, scale=None, n_future=512,
                n_sink=4, use_cov=True, use_vnorm=True, epsilon=0.0):
    """kvpress ExpectedAttentionPress.score, float64, plain loops over heads.

    ``pre_q`` ``[Hq, W, D]`` pre-RoPE queries the statistics come from (sinks
    already removed by the caller); ``pre_k`` ``[Hkv, N, D]`` pre-RoPE keys at
    absolute positions ``k_pos`` (the first ``n_sink`` are the sinks);
    ``now``: absolute position of the newest token; ``freqs=None``: no RoPE.
    """
    hq, w, d = pre_q.shape
    hkv, n, _ = pre_k.shape
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    if freqs is None:
        keys, rbar = pre_k.double(), torch.eye(d, dtype=torch.float64)
    else:
        keys = apply_rope(pre_k, k_pos, freqs)
        rbar = sum(rope_matrix(p, freqs, d) for p in range(now + 1, now + 1 + n_future))
        rbar = rbar / n_future
    out = torch.zeros(hkv, n, dtype=torch.float64)
    for h in range(hkv):
        for qh in range(h * g, (h + 1) * g):
            q = pre_q[qh].double()
            mu = q.mean(0)
            cov = (q - mu).T @ (q - mu) / w
            mu, cov = rbar @ mu, rbar @ cov @ rbar.T
            logit = []
            for j in range(n_sink, n):
                k = keys[h, j]
                z = scale * float(mu @ k)
                if use_cov:
                    z += 0.5 * scale * scale * float(k @ cov @ k)
                logit.append(z)
            m = max(logit)
            e = [math.exp(z - m) for z in logit]
            for j, x in zip(range(n_sink, n), e):
                out[h, j] += x / sum(e) / g
    if use_vnorm:
        vn = values.double().norm(dim=-1)
        out[:, n_sink:] = (out[:, n_sink:] + epsilon) * vn[:, n_sink:]
    out[:, :n_sink] = out[:, n_sink:].max() + 1
    return out


def _layer_inputs(seed, hkv=2, g=3, n=30, w=6, d=8):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(hkv, n, d, generator=gen)
    queries = torch.randn(hkv * g, w, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    return keys, queries, torch.arange(n - w, n), values


# ------------------------------------------------------------- vs kvpress
CASES = [  # hkv, g, n, w, d
    (2, 3, 30, 6, 8),
    (1, 1, 12, 12, 4),  # window larger than head dim: full-covariance path
    (3, 2, 41, 5, 16),
    (1, 4, 20, 9, 6),
]


@pytest.mark.parametrize("theta", [None, 100.0])
@pytest.mark.parametrize("hkv, g, n, w, d", CASES)
def test_matches_kvpress_uncompacted(theta, hkv, g, n, w, d):
    """Whole sequence observed (window = every token): kvpress's exact inputs."""
    gen = torch.Generator().manual_seed(n * 7 + d)
    sink = 3
    pre_q = torch.randn(hkv * g, n, d, generator=gen)
    pre_k = torch.randn(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    freqs = None if theta is None else rope_frequencies(theta, d)
    pos = list(range(n))
    q = pre_q if freqs is None else apply_rope(pre_q, pos, freqs).float()
    k = pre_k if freqs is None else apply_rope(pre_k, pos, freqs).float()
    obs = Observation(k[None], q[None], torch.arange(n), [0.3], values=values[None],
                      rope_inv_freq=freqs)
    for use_cov, vnorm, eps in [(True, True, 0.0), (False, True, 0.0), (True, False, 0.0),
                                (True, True, 0.01)]:
        m = ExpectedAttention(use_cov=use_cov, vnorm=vnorm, epsilon=eps, n_future=64,
                              n_sink=sink)
        got = m.score_layers(obs, {})[0]
        ref = ref_kvpress(pre_q[:, sink:], pre_k, pos, values, freqs, n - 1, scale=0.3,
                          n_future=64, n_sink=sink, use_cov=use_cov, use_vnorm=vnorm,
                          epsilon=eps)
        torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("partial", [False, True])
def test_matches_kvpress_on_compacted_cache(partial):
    """Physical indices differ from positions: sinks, a scattered middle, then
    the contiguous newest tokens whose queries form the window."""
    gen = torch.Generator().manual_seed(11)
    hkv, g, d, w, sink = 2, 2, 8, 5, 4
    logical = list(range(sink)) + [9, 17, 18, 40, 41, 55, 70] + list(range(93, 93 + w))
    n, now = len(logical), logical[-1]
    freqs = rope_frequencies(50.0, d)
    if partial:  # rotary on half of the head (R = d / 4 frequencies)
        freqs = rope_frequencies(50.0, d // 2)
    pre_q = torch.randn(hkv * g, w, d, generator=gen)
    pre_k = torch.randn(hkv, n, d, generator=gen)
    values = torch.rand(hkv, n, d, generator=gen)
    q = apply_rope(pre_q, logical[-w:], freqs).float()
    k = apply_rope(pre_k, logical, freqs).float()
    obs = Observation(k[None], q[None], torch.arange(n - w, n), [d**-0.5],
                      values=values[None], rope_inv_freq=freqs)
    got = ExpectedAttention(n_future=100, n_sink=sink).score_layers(obs, {})[0]
    ref = ref_kvpress(pre_q, pre_k, logical, values, freqs, now, n_future=100,
                      n_sink=sink)
    torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=1e-6)
    # The rotation matters: without frequencies the ranking is different.
    plain = ExpectedAttention(n_future=100, n_sink=sink).score_layers(
        Observation(k[None], q[None], torch.arange(n - w, n), [d**-0.5],
                    values=values[None]), {})[0]
    assert not torch.allclose(plain, got, rtol=1e-2)


def test_rope_theta_arg_equals_given_frequencies_and_per_layer_table():
    gen = torch.Generator().manual_seed(3)
    l, hkv, g, n, w, d = 3, 2, 2, 25, 4, 8
    keys = torch.randn(l, hkv, n, d, generator=gen)
    q = torch.randn(l, hkv * g, w, d, generator=gen)
    vals = torch.randn(l, hkv, n, d, generator=gen)
    qpos = torch.arange(n - w, n)
    by_theta = ExpectedAttention(rope_theta=1000.0).score_layers(
        Observation(keys, q, qpos, values=vals), {})
    f = rope_frequencies(1000.0, d)
    given = ExpectedAttention().score_layers(
        Observation(keys, q, qpos, values=vals, rope_inv_freq=f), {})
    torch.testing.assert_close(by_theta, given)
    # Per-layer table: layer 1 with other frequencies; the others unchanged.
    table = torch.stack([f, rope_frequencies(10.0, d), f])
    mixed = ExpectedAttention().score_layers(
        Observation(keys, q, qpos, values=vals, rope_inv_freq=table), {})
    torch.testing.assert_close(mixed[[0, 2]], given[[0, 2]])
    one = ExpectedAttention(rope_theta=10.0).score_layers(
        Observation(keys[1:2], q[1:2], qpos, values=vals[1:2]), {})
    torch.testing.assert_close(mixed[1], one[0])
    # Observation frequencies win over the argument.
    torch.testing.assert_close(ExpectedAttention(rope_theta=10.0).score_layers(
        Observation(keys, q, qpos, values=vals, rope_inv_freq=f), {}), given)
    with pytest.raises(ValueError, match="head dim"):
        expected_attention_scores(keys[0], q[0], qpos, inv_freq=rope_frequencies(9.0, 2 * d))


# --------------------------------------------------- closed-form identities
@pytest.mark.parametrize("seed", range(3))
def test_without_covariance_is_attention_of_the_mean_query(seed):
    keys, q, qpos, _ = _layer_inputs(seed)
    n = keys.shape[1]
    got = expected_attention_scores(keys, q, qpos, 0.4, use_cov=False, n_sink=0)
    mean_q = q.mean(dim=1, keepdim=True)  # [Hq, 1, D]
    ref = window_attention(keys, mean_q, torch.tensor([n - 1]), 0.4)[:, :, 0].mean(1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    # A one-query window has Sigma = 0: the covariance term changes nothing.
    one = expected_attention_scores(keys, q[:, -1:], qpos[-1:], 0.4, n_sink=0)
    ref1 = window_attention(keys, q[:, -1:], torch.tensor([n - 1]), 0.4)[:, :, 0].mean(1)
    torch.testing.assert_close(one, ref1, rtol=1e-5, atol=1e-7)


def test_monte_carlo_expectation_of_exp():
    """softmax_n(s mu.k_n + s^2/2 k_n'Sigma k_n) = normalised E[exp(s q.k_n)],
    q ~ N(mu, Sigma) with the window's mean and (biased) covariance."""
    gen = torch.Generator().manual_seed(0)
    d, w, n, s = 4, 7, 15, 0.5
    keys = torch.randn(1, n, d, generator=gen, dtype=torch.float64) * 0.7
    q = torch.randn(2, w, d, generator=gen, dtype=torch.float64) + 0.3
    got = expected_attention_scores(keys.float(), q.float(), torch.arange(n - w, n), s,
                                    n_sink=0)
    mu = q.mean(1)
    c = q - mu[:, None]  # Sigma = c'c / w: sample mu + c' z / sqrt(w), z ~ N(0, I_w)
    z = torch.randn(2, 400_000, w, generator=gen, dtype=torch.float64)
    samples = mu[:, None] + z @ c / math.sqrt(w)  # [2, S, D]
    e = torch.exp(s * samples @ keys[0].T).mean(1)  # [2, N]
    ref = (e / e.sum(-1, keepdim=True)).mean(0, keepdim=True)
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=0)
    # The covariance term is not negligible here: dropping it is far off.
    nocov = expected_attention_scores(keys.float(), q.float(), torch.arange(n - w, n), s,
                                      n_sink=0, use_cov=False)
    assert (nocov.double() - ref).abs().max() > 5e-3


def test_low_rank_and_full_covariance_agree():
    keys, q, qpos, _ = _layer_inputs(5, hkv=2, g=2, n=40, w=6, d=8)
    low = expected_attention_scores(keys, q, qpos, n_sink=2)  # w <= d
    # The same statistics from a repeated window (w = 12 > d): same Gaussian.
    rep = torch.cat([q, q], dim=1)
    full = expected_attention_scores(keys, rep, torch.cat([qpos, qpos]), n_sink=2)
    torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------- shapes, sinks
def test_shapes_gqa_dtypes_and_sinks():
    keys, q, qpos, vals = _layer_inputs(1, hkv=2, g=4, n=33, w=5, d=16)
    s = expected_attention_scores(keys.bfloat16(), q.bfloat16(), qpos, values=vals, n_sink=4)
    assert s.shape == (2, 33) and s.dtype == torch.float32
    assert torch.all(s[:, :4] == s[:, 4:].max() + 1)
    nv = expected_attention_scores(keys, q, qpos, n_sink=4)
    torch.testing.assert_close(nv[:, 4:].sum(-1), torch.ones(2))  # a distribution
    with pytest.raises(ValueError, match="multiple"):
        expected_attention_scores(keys, q[:7], qpos)
    # All sinks: uniform, still finite.
    assert torch.equal(expected_attention_scores(keys[:, :3], q, qpos), torch.ones(2, 3))
    # Window queries of the sink tokens are left out of the statistics.
    qp = torch.tensor([0, 1, 30, 31, 32])
    a = expected_attention_scores(keys, q, qp, n_sink=4)
    b = expected_attention_scores(keys, q[:, 2:], qp[2:], n_sink=4)
    torch.testing.assert_close(a, b)


def test_validation():
    for kw in ({"epsilon": -1.0}, {"n_future": 0}, {"n_sink": -1}, {"rope_theta": 0.5}):
        with pytest.raises(ValueError):
            ExpectedAttention(**kw)
    m = ExpectedAttention()
    assert m.name == "expected_attention" and m.needs_queries and not m.stateful
    obs = Observation(torch.randn(1, 2, 10, 8), None, values=torch.randn(1, 2, 10, 8))
    with pytest.raises(ValueError, match="observation window"):
        m.score_layers(obs, {})
    with pytest.raises(ValueError, match="values"):
        m.score(torch.randn(2, 10, 8), torch.randn(2, 2, 8), torch.tensor([8, 9]))
    keys, q, qpos, _ = _layer_inputs(2)
    torch.testing.assert_close(ExpectedAttention(vnorm=False).score(keys, q, qpos),
                               expected_attention_scores(keys, q, qpos))


# ------------------------------------------------------------ compress_event
def _obs(seed, l=2, hkv=2, g=2, n=60, w=6, d=8):
    gen = torch.Generator().manual_seed(seed)
    return (Observation(torch.randn(l, hkv, n, d, generator=gen),
                        torch.randn(l, hkv * g, w, d, generator=gen),
                        torch.arange(n - w, n), [d**-0.5] * l),
            torch.rand(l, hkv, n, d, generator=gen))


def test_compress_event_keeps_sinks_recent_and_top_scores():
    obs, vals = _obs(0)
    reads = []

    def values():
        reads.append(1)
        return vals

    m = build_method(KVShrinkConfig(method="expected_attention"))
    res = compress_event(m, obs, {}, 24, 4, 8, values=values)
    assert res.keep.shape == (2, 2, 24) and len(reads) == 1
    assert torch.all(res.keep[..., :4] == torch.arange(4))
    assert torch.all(res.keep[..., -8:] == torch.arange(52, 60))
    ref = torch.stack([expected_attention_scores(obs.keys[i], obs.queries[i], obs.query_pos,
                                                 values=vals[i]) for i in range(2)])
    torch.testing.assert_close(res.scores, ref)
    for li in range(2):
        for h in range(2):
            mid = ref[li, h, 4:52]
            want = (torch.topk(mid, 12).indices + 4).sort().values
            assert res.keep[li, h, 4:16].tolist() == want.tolist()
    # Without the value norm the values are never read.
    obs2, _ = _obs(0)
    m2 = build_method(KVShrinkConfig(method="expected_attention",
                                     method_args={"ea_vnorm": False}))
    compress_event(m2, obs2, {}, 24, 4, 8, values=values)
    assert len(reads) == 1


def test_composes_with_semantic_reading_values_once():
    obs, vals = _obs(4)
    reads = []
    m = build_method(KVShrinkConfig(method="expected_attention+semantic"))
    res = compress_event(m, obs, {}, 24, 4, 8, values=lambda: reads.append(1) or vals)
    assert len(reads) == 1 and res.keys.shape == (2, 2, 24, 8)


# ------------------------------------------------------------------- registry
def test_registry_and_args():
    assert "expected_attention" in available_methods()
    assert "expected_attention+semantic" in available_methods()
    assert parse_method("expected_attention") == ("expected_attention", False)
    assert "expected_attention" in describe_methods()
    args = resolve_args("expected_attention", {}, "X")
    assert {k: args[k] for k in args if k.startswith("ea_")} == {
        "ea_cov": True, "ea_vnorm": True, "ea_epsilon": 0.0, "ea_future": 512,
        "ea_sink": 4, "ea_rope_theta": 0.0}
    args = resolve_args("expected_attention", {"ea_rope_theta": 10000, "ea_epsilon": 0},
                        "X")
    assert args["ea_rope_theta"] == 10000.0 and isinstance(args["ea_epsilon"], float)
    for bad, match in [({"ea_future": 0}, "out of range"), ({"ea_sink": -1}, "out of range"),
                       ({"ea_epsilon": -0.1}, "out of range"),
                       ({"ea_rope_theta": 0.5}, "out of range"),
                       ({"ea_cov": 1}, "not a bool"), ({"ea_future": 1.5}, "not a int"),
                       ({"ema_decay": 0.5}, "does not apply")]:
        with pytest.raises(ValueError, match=match):
            resolve_args("expected_attention", bad, "X")
    with pytest.raises(ValueError, match="does not apply"):
        resolve_args("snapkv", {"ea_cov": False}, "X")
    with pytest.raises(KVShrinkConfigError):
        KVShrinkConfig(method="expected_attention", method_args={"ea_future": -3})
    cfg = KVShrinkConfig(method="expected_attention", method_args={
        "ea_cov": False, "ea_vnorm": False, "ea_epsilon": 0.1, "ea_future": 64,
        "ea_sink": 2, "ea_rope_theta": 500000.0})
    cfg.check_servable()
    m = build_method(cfg)
    assert isinstance(m, ExpectedAttention)
    assert (m.use_cov, m.vnorm, m.epsilon, m.n_future, m.n_sink, m.rope_theta) == (
        False, False, 0.1, 64, 2, 500000.0)


# ----------------------------------------------------------------- real model
def test_real_model_matches_kvpress(hf_model):
    """SmolLM2 (Llama): kvpress's statistics from the model's pre-RoPE queries
    and its rotary module vs ours from the post-RoPE queries and inv_freq."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, layers = hf_model, (0, 7)
    seen = {}

    def hook(i):
        def pre(mod, args, kwargs):
            seen[i] = (kwargs.get("hidden_states", args[0] if args else None),
                       kwargs["position_embeddings"])
        return pre

    hs = [model.model.layers[i].self_attn.register_forward_pre_hook(hook(i),
                                                                     with_kwargs=True)
          for i in layers]
    try:
        ids = torch.randint(100, 20000, (1, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(ids)
    finally:
        for h in hs:
            h.remove()
    rot = model.model.rotary_emb
    sink, fut = 4, 512
    for i in layers:
        att = model.model.layers[i].self_attn
        h, (cos, sin) = seen[i]
        t, d = h.shape[1], att.head_dim
        with torch.no_grad():
            q = att.q_proj(h).view(1, t, -1, d).transpose(1, 2)
            k = att.k_proj(h).view(1, t, -1, d).transpose(1, 2)
            v = att.v_proj(h).view(1, t, -1, d).transpose(1, 2)
            qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
            # kvpress: statistics of pre-RoPE queries n_sink.., averaged R from
            # the model's rotary module on positions t .. t + F - 1.
            qs = q[0, :, sink:].double()
            mu = qs.mean(1)
            cen = qs - mu[:, None]
            cov = torch.einsum("nsi,nsj->nij", cen, cen) / qs.shape[1]
            c, s = rot(q, torch.arange(t, t + fut)[None])
            c, s = c[0].double(), s[0].double()
            eye = torch.eye(d, dtype=torch.float64)
            p = torch.zeros(d, d, dtype=torch.float64)
            p[d // 2:, :d // 2], p[:d // 2, d // 2:] = torch.eye(d // 2), -torch.eye(d // 2)
            r = (c[:, :, None] * eye + s[:, :, None] * p).mean(0)
            mu, cov = mu @ r.T, r @ cov @ r.T
            g = q.shape[1] // k.shape[1]
            keys = kr[0, :, sink:].double().repeat_interleave(g, 0)  # [Hq, N', D]
            z = torch.einsum("nd,nkd->nk", mu, keys) / math.sqrt(d)
            z += torch.einsum("nkd,nde,nke->nk", keys, cov, keys) / d / 2
            ref = torch.softmax(z, -1).view(k.shape[1], g, -1).mean(1)
            ref = ref * v[0, :, sink:].double().norm(dim=-1)
            obs = Observation(kr, qr, torch.arange(t), [att.scaling], values=v,
                              rope_inv_freq=rot.inv_freq)
            got = ExpectedAttention(n_future=fut, n_sink=sink).score_layers(obs, {})[0]
        torch.testing.assert_close(got[:, sink:].double(), ref, rtol=1e-3, atol=1e-6)
        assert torch.all(got[:, :sink] == got[:, sink:].max() + 1)
