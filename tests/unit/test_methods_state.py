"""H2O, TOVA, EMA, the temporal predictor, the semantic merger, MiniCache and
per-head budgets against plain loop references (pure tensors, no engine)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError
from vllm_kvshrink.methods import (
    Observation,
    available_methods,
    build_method,
    compress_event,
)
from vllm_kvshrink.methods.budgets import head_budgets
from vllm_kvshrink.methods.ema import EMAAttention
from vllm_kvshrink.methods.h2o import H2O
from vllm_kvshrink.methods.minicache import MiniCache, slerp_merge
from vllm_kvshrink.methods.semantic import SharedEmbedding, group_and_merge
from vllm_kvshrink.methods.temporal import (
    SharedPredictor,
    TemporalImportance,
    features,
    ranking_accuracy,
)
from vllm_kvshrink.methods.tova import TOVA


def loop_attention(keys, queries, qpos, scale):
    """[L, Hkv, W, N] GQA-mean attention, one (layer, q-head, query) at a time."""
    l, hkv, n, d = keys.shape
    hq, w = queries.shape[1:3]
    g = hq // hkv
    out = torch.zeros(l, hkv, w, n)
    for li in range(l):
        for qh in range(hq):
            for wi in range(w):
                vis = int(qpos[wi]) + 1
                logits = [float(queries[li, qh, wi] @ keys[li, qh // g, j]) * scale
                          for j in range(vis)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                s = sum(e)
                for j in range(vis):
                    out[li, qh // g, wi, j] += e[j] / s / g
    return out


def make_obs(seed, l=2, hkv=2, g=2, n=23, w=5, d=8):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(l, hkv, n, d, generator=gen)
    q = torch.randn(l, hkv * g, w, d, generator=gen)
    qpos = torch.arange(n - w, n)
    return Observation(keys, q, qpos, [d**-0.5] * l)


def test_observation_attention_matches_loop():
    obs = make_obs(0)
    ref = loop_attention(obs.keys, obs.queries, obs.query_pos, obs.scales[0])
    torch.testing.assert_close(obs.attention(), ref, atol=1e-6, rtol=1e-5)


def test_h2o_accumulates_each_query_once_across_events():
    obs1 = make_obs(1)
    st: dict = {}
    h2o = H2O()
    s1 = h2o.score_layers(obs1, st)
    torch.testing.assert_close(s1, loop_attention(obs1.keys, obs1.queries,
                                                  obs1.query_pos, obs1.scales[0]).sum(2))
    keep = torch.tensor([0, 3, 7, 18, 19, 20, 21, 22]).expand(2, 2, -1)
    h2o.update(st, keep)
    # Next event: 8 kept + 6 new tokens; the window's last 2 queries are old
    # (physical < 8) and must not be counted again.
    gen = torch.Generator().manual_seed(5)
    keys2 = torch.cat([obs1.keys.gather(2, keep[..., None].expand(-1, -1, -1, 8)),
                       torch.randn(2, 2, 6, 8, generator=gen)], dim=2)
    q2 = torch.randn(2, 4, 5, 8, generator=gen)
    qpos2 = torch.tensor([6, 7, 8, 11, 13])
    obs2 = Observation(keys2, q2, qpos2, obs1.scales)
    s2 = h2o.score_layers(obs2, st)
    a2 = loop_attention(keys2, q2, qpos2, obs1.scales[0])
    expect = a2[:, :, 2:].sum(2)
    expect[:, :, :8] += s1.gather(2, keep)
    torch.testing.assert_close(s2, expect, atol=1e-6, rtol=1e-5)


def test_ema_matches_sequential_update():
    obs = make_obs(2)
    st: dict = {"ema": torch.rand(2, 2, 10), "n": 0}
    prev = st["ema"].clone()
    s = EMAAttention(0.8).score_layers(obs, st)
    a = loop_attention(obs.keys, obs.queries, obs.query_pos, obs.scales[0])
    ref = torch.cat([prev, torch.zeros(2, 2, 13)], dim=2)
    for t in range(a.shape[2]):
        ref = 0.8 * ref + 0.2 * a[:, :, t]
    torch.testing.assert_close(s, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="ema_decay"):
        EMAAttention(1.0)


def test_tova_uses_newest_query_mean_over_layer_heads():
    obs = make_obs(3)
    s = TOVA().score_layers(obs, {})
    l, hkv, n, d = obs.keys.shape
    for li in range(l):
        rows = []
        for qh in range(obs.queries.shape[1]):
            logits = obs.queries[li, qh, -1] @ obs.keys[li, qh // 2].T * obs.scales[0]
            rows.append(torch.softmax(logits, -1))
        ref = torch.stack(rows).mean(0)
        for h in range(hkv):
            torch.testing.assert_close(s[li, h], ref, atol=1e-6, rtol=1e-5)


def test_ranking_accuracy_against_scipy():
    from scipy.stats import spearmanr

    gen = torch.Generator().manual_seed(0)
    true = torch.rand(4, 50, generator=gen)
    pred = true + 0.3 * torch.rand(4, 50, generator=gen)
    recall, rho = ranking_accuracy(pred, true, frac=0.1)
    ref_rho = sum(spearmanr(pred[i], true[i]).statistic for i in range(4)) / 4
    assert rho == pytest.approx(ref_rho, abs=1e-5)
    ref_rec = sum(len(set(pred[i].topk(5).indices.tolist())
                      & set(true[i].topk(5).indices.tolist())) / 5 for i in range(4)) / 4
    assert recall == pytest.approx(ref_rec)
    assert ranking_accuracy(true, true) == pytest.approx((1.0, 1.0))


def test_temporal_features():
    a = torch.rand(1, 1, 3, 5)
    a /= a.sum(-1, keepdim=True)
    hist, static = features(a, torch.zeros(1, 1, 5), n_prev=2, history=4)
    assert hist.shape == (1, 1, 5, 4) and static.shape == (1, 1, 5, 4)
    torch.testing.assert_close(hist[0, 0, :, 1:], torch.log1p(a[0, 0] * 5).T)
    assert torch.all(hist[..., 0] == 0)  # padded in front
    assert static[0, 0, :, 2].tolist() == [1, 1, 0, 0, 0]
    assert static[0, 0, 0, 1] == 1 and static[0, 0, -1, 1] == 0


def test_predictor_trains_saves_and_loads(tmp_path):
    p = SharedPredictor(seed=1, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    hist = torch.rand(512, 16, generator=gen)
    static = torch.rand(512, 4, generator=gen)
    target = hist[:, -4:].mean(1) * 2 + static[:, 0]  # learnable
    first = p.train_step(hist, static, target)
    for _ in range(150):
        last = p.train_step(hist, static, target)
    assert last < 0.2 * first
    p.save(tmp_path / "t.pt", note="x")
    q = SharedPredictor(tmp_path / "t.pt")
    torch.testing.assert_close(q.predict(hist, static), p.predict(hist, static))
    assert q.meta["note"] == "x"
    with pytest.raises(FileNotFoundError, match="predictor_path"):
        SharedPredictor(tmp_path / "missing.pt")


def test_temporal_online_training_happens_between_events():
    p = SharedPredictor(seed=2)
    m = TemporalImportance(p, online=True, train_rows=64)
    st: dict = {}
    obs = make_obs(4, n=40, w=6)
    res = compress_event(m, obs, st, 24, 2, 8)
    assert p.stats["updates"] == 0 and st["n"] == 24 and "train_rows" in st
    gen = torch.Generator().manual_seed(1)
    keys2 = torch.cat([obs.keys.gather(2, res.keep[..., None].expand(-1, -1, -1, 8)),
                       torch.randn(2, 2, 10, 8, generator=gen)], dim=2)
    obs2 = Observation(keys2, torch.randn(2, 4, 6, 8, generator=gen),
                       torch.arange(28, 34), obs.scales)
    compress_event(m, obs2, st, 24, 2, 8)
    assert p.stats["updates"] == 1 and p.stats["scored_events"] == 1
    assert -1 <= p.summary()["spearman"] <= 1


def loop_merge(keys, values, weights, keep, z, thr, counts):
    l, h, n, d = keys.shape
    k = keep.shape[2]
    mk = torch.zeros(l, h, k, d)
    mv = torch.zeros(l, h, k, d)
    cnt = torch.zeros(l, h, k)
    merged = 0
    for li in range(l):
        for hi in range(h):
            kept = keep[li, hi].tolist()
            groups = {j: [j] for j in kept}
            for t in range(n):
                if t in groups:
                    continue
                sims = [float(z[li, hi, t] @ z[li, hi, j]) for j in kept]
                best = max(range(k), key=lambda i: sims[i])
                if sims[best] >= thr:
                    groups[kept[best]].append(t)
                    merged += 1
            for slot, j in enumerate(kept):
                w = torch.tensor([float(weights[li, hi, t] * counts[li, hi, t])
                                  for t in groups[j]])
                mk[li, hi, slot] = (w[:, None] * keys[li, hi, groups[j]]).sum(0) / w.sum()
                mv[li, hi, slot] = (w[:, None] * values[li, hi, groups[j]]).sum(0) / w.sum()
                cnt[li, hi, slot] = sum(float(counts[li, hi, t]) for t in groups[j])
    return mk, mv, cnt, merged


@pytest.mark.parametrize("thr", [-1.0, 0.2, 0.9])
def test_group_and_merge_matches_loop(thr):
    gen = torch.Generator().manual_seed(7)
    l, h, n, d = 2, 3, 17, 4
    keys, values = torch.randn(l, h, n, d, generator=gen), torch.randn(l, h, n, d, generator=gen)
    weights = torch.rand(l, h, n, generator=gen) + 0.01
    counts = torch.randint(1, 4, (l, h, n), generator=gen).float()
    keep = torch.stack([torch.stack([torch.randperm(n, generator=gen)[:6].sort().values
                                     for _ in range(h)]) for _ in range(l)])
    z = torch.nn.functional.normalize(torch.randn(l, h, n, 5, generator=gen), dim=-1)
    got = group_and_merge(keys, values, weights, keep, z, thr, counts)
    ref = loop_merge(keys, values, weights, keep, z, thr, counts)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[3] == ref[3]
    if thr == -1.0:
        assert got[3] == l * h * (n - 6)  # everything folds in
        assert torch.all(got[2].sum(-1) == counts.sum(-1))


def test_semantic_embedding_contrastive_step_learns():
    """Tokens whose attention profiles match (same hidden cluster) end up
    closer in the learned space than in the initial random projection, even
    though the cluster lives in 2 of 8 key dimensions under loud noise."""
    gen = torch.Generator().manual_seed(3)
    emb = SharedEmbedding(8, dim=4, lr=2e-2, seed=0)
    cluster = torch.randint(0, 4, (1, 1, 96), generator=gen)
    centers = torch.zeros(4, 8)
    centers[:, :2] = torch.tensor([[3.0, 0], [-3, 0], [0, 3], [0, -3]])
    keys = centers[cluster] + torch.cat([0.2 * torch.randn(1, 1, 96, 2, generator=gen),
                                         3 * torch.randn(1, 1, 96, 6, generator=gen)], -1)
    prof = torch.nn.functional.one_hot(cluster, 4).float() * 0.5 + 0.01

    def margin():
        z = emb.embed(keys)[0, 0]
        sim = z @ z.T
        same = cluster[0, 0][:, None] == cluster[0, 0][None, :]
        return float(sim[same].mean() - sim[~same].mean())

    before = margin()
    for _ in range(150):
        emb.contrastive_step(keys, prof, samples=64, pairs=2)
    assert margin() > before + 0.2


def test_minicache_merge_reference():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 9, 6, generator=gen)
    b = a + 0.3 * torch.randn(2, 9, 6, generator=gen)
    b[0, 0] = -a[0, 0]  # opposite: must be retained
    a2, b2, merged = slerp_merge(a, b, retain_cos=0.0)
    assert not merged[0, 0]
    torch.testing.assert_close(a2[0, 0], a[0, 0])
    for i, j in merged.nonzero().tolist():
        direction = a[i, j] / a[i, j].norm() + b[i, j] / b[i, j].norm()
        direction /= direction.norm()
        torch.testing.assert_close(a2[i, j], a[i, j].norm() * direction)
        torch.testing.assert_close(b2[i, j], b[i, j].norm() * direction)
    mc = MiniCache(start=0.5)
    assert mc.pairs(8) == [(4, 5), (6, 7)]
    keys = [torch.randn(2, 5, 4, generator=gen) for _ in range(4)]
    vals = [torch.randn(2, 5, 4, generator=gen) for _ in range(4)]
    protect = torch.tensor([True, False, False, False, True])
    before = [k.clone() for k in keys]
    shared = MiniCache(start=0.5, retain_cos=-1.0).apply(keys, vals, protect)
    assert torch.equal(keys[0], before[0]) and torch.equal(keys[2][:, 0], before[2][:, 0])
    assert shared[3][:, 1:4].all() and not shared[3][:, 0].any()


def test_head_budgets():
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(4, 3, 50, generator=gen)
    s[1, 0] *= 10  # one concentrated head takes more of the layer's budget
    s[..., :2] = float("inf")
    u = head_budgets(s, 20, 6, "uniform")
    assert torch.all(u == 20)
    a = head_budgets(s, 20, 6, "adaptive")
    assert torch.all(a.sum(1) == 60) and torch.all(a >= 6)
    assert a[1, 0] == a[1].max()
    p = head_budgets(s, 20, 6, "pyramid")
    assert p[0, 0] == 30 and p[-1, 0] == 10 and torch.all(p[:-1, 0] >= p[1:, 0])
    with pytest.raises(ValueError, match="head_budget"):
        head_budgets(s, 20, 6, "nope")


def test_compress_event_with_adaptive_budget_hides_extra_slots():
    obs = make_obs(9, n=40)
    res = compress_event(H2O(), obs, {}, 16, 2, 6, budget_mode="adaptive")
    assert res.visible is not None
    assert int(res.visible.sum()) == pytest.approx(obs.num_layers * 2 * 16, abs=2)
    assert res.visible[:, :, :2].all() and res.visible[:, :, -6:].all()


def test_every_registered_method_builds_and_runs():
    obs = make_obs(11, n=60, w=6)
    vals = torch.randn_like(obs.keys)
    for name in available_methods():
        if name in ("none", "minicache"):
            continue
        cfg = KVShrinkConfig(method=name, sink_tokens=2, recent_tokens=8,
                             obs_window=6)
        m = build_method(cfg)
        res = compress_event(m, obs, {}, 24, 2, 8, values=vals)
        assert res.keep.shape == (2, 2, 24), name
        assert torch.all(res.keep[:, :, :2] == torch.tensor([0, 1])), name
        if m.merges:
            assert res.keys.shape == (2, 2, 24, 8)


def test_method_args_validation():
    with pytest.raises(KVShrinkConfigError, match="does not apply to method 'h2o'"):
        KVShrinkConfig(method="h2o", method_args={"ema_decay": 0.5})
    with pytest.raises(KVShrinkConfigError, match="unknown key 'foo'"):
        KVShrinkConfig(method="h2o", method_args={"foo": 1})
    with pytest.raises(KVShrinkConfigError, match=r"merge_threshold'\]=2.0 is out of range"):
        KVShrinkConfig(method="semantic", method_args={"merge_threshold": 2})
    with pytest.raises(KVShrinkConfigError, match="not a bool"):
        KVShrinkConfig(method="temporal", method_args={"online": "yes"})
    cfg = KVShrinkConfig(method="snapkv", method_args={"head_budget": "adaptive"})
    with pytest.raises(KVShrinkConfigError, match="research path only"):
        cfg.check_servable()
    with pytest.raises(KVShrinkConfigError, match="research path only"):
        KVShrinkConfig(method="minicache").check_servable()
    KVShrinkConfig(method="temporal+semantic",
                   method_args={"online": False, "merge_threshold": 0.3}).check_servable()
    # A request switching method drops the global method's arguments.
    g = KVShrinkConfig(method="ema", method_args={"ema_decay": 0.5})
    assert g.with_overrides({"method": "snapkv"}).method_args == {}


def test_temporal_net_closed_form_matches_plain_block():
    from vllm_kvshrink.methods.temporal import TemporalNet

    torch.manual_seed(0)
    net = TemporalNet()
    hist, static = torch.rand(37, 16) * 3, torch.rand(37, 4)
    torch.testing.assert_close(net(hist, static), net.reference_forward(hist, static),
                               atol=1e-5, rtol=1e-5)
