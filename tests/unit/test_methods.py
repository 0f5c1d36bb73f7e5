"""Tests of vllm_kvshrink.methods: select_keep, SnapKV, StreamingLLM, registry.

Every method is compared with a plain-Python / per-element loop reference.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.methods import (
    ScoringMethod,
    available_methods,
    build_method,
    describe_methods,
    select_keep,
)
from vllm_kvshrink.methods.snapkv import SnapKV, window_attention
from vllm_kvshrink.methods.streaming import StreamingLLM


# ------------------------------------------------------------------ select_keep
def ref_select(row: list[float], num_keep: int, sinks: int, recent: int) -> list[int]:
    """Brute force: sinks + recent window, then the highest remaining scores
    (NaN lowest), returned ascending."""
    n = len(row)
    if num_keep >= n:
        return list(range(n))
    forced = set(range(min(sinks, n))) | set(range(max(0, n - recent), n))
    rest = [i for i in range(n) if i not in forced]

    def key(i):  # NaN below everything, -inf included
        v = row[i]
        return (0, 0.0) if math.isnan(v) else (1, v)

    rest.sort(key=key, reverse=True)
    chosen = forced | set(rest[: num_keep - len(forced)])
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "heads, n, sinks, recent",
    [(1, 10, 0, 1), (2, 37, 4, 8), (3, 101, 1, 5), (8, 64, 4, 32), (5, 513, 4, 32),
     (4, 9, 0, 9), (2, 50, 50, 0), (2, 33, 3, 0)],
)
def test_select_keep_matches_reference(seed, heads, n, sinks, recent):
    g = torch.Generator().manual_seed(seed * 1000 + n)
    scores = torch.rand(heads, n, generator=g)  # continuous: no ties
    rnd = random.Random(seed)
    lo = min(n, sinks + recent)
    sizes = sorted({lo, n - 1, n, n + 3, rnd.randint(lo, n)} - {-1})
    for k in sizes:
        if k < lo:
            continue
        got = select_keep(scores, k, sinks, recent)
        kk = min(k, n)
        assert got.shape == (heads, kk)
        assert got.dtype == torch.int64
        for h in range(heads):
            row = got[h].tolist()
            assert row == sorted(row)
            assert row == ref_select(scores[h].tolist(), k, sinks, recent), (h, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_select_keep_other_dtypes(dtype):
    g = torch.Generator().manual_seed(7)
    # distinct after conversion: a permutation of integers
    scores = torch.stack([torch.randperm(200, generator=g) for _ in range(3)]).to(dtype)
    got = select_keep(scores, 50, 4, 8)
    for h in range(3):
        assert got[h].tolist() == ref_select(scores[h].double().tolist(), 50, 4, 8)


def test_select_keep_all_returns_arange():
    scores = torch.randn(3, 17)
    for k in (17, 18, 100):
        got = select_keep(scores, k, 4, 8)
        assert torch.equal(got, torch.arange(17).expand(3, 17))
        assert got.shape == (3, 17)
        got[0, 0] = 99  # a real tensor, not an expanded view
        assert got[1, 0] == 0


def test_select_keep_sinks_and_recent_beat_high_scores():
    n = 40
    scores = torch.zeros(2, n)
    scores[:, :4] = -1e9
    scores[:, -8:] = -1e9
    scores[:, 10] = 1e9
    scores[:, 20] = float("inf")
    got = select_keep(scores, 4 + 8, 4, 8)
    assert got.tolist() == [list(range(4)) + list(range(n - 8, n))] * 2
    got = select_keep(scores, 4 + 8 + 2, 4, 8)
    assert got.tolist() == [list(range(4)) + [10, 20] + list(range(n - 8, n))] * 2


def test_select_keep_raises_below_floor():
    scores = torch.rand(2, 50)
    with pytest.raises(ValueError, match="sink_tokens \\+ recent_tokens"):
        select_keep(scores, 11, 4, 8)
    with pytest.raises(ValueError):
        select_keep(scores, 0, 0, 1)
    select_keep(scores, 12, 4, 8)  # exactly the floor is fine


def test_select_keep_nan_never_beats_finite():
    g = torch.Generator().manual_seed(3)
    n = 60
    scores = torch.rand(4, n, generator=g) - 10.0  # all finite, negative
    nan_at = [5, 6, 20, 30, 31, 40]
    scores[:, nan_at] = float("nan")
    scores[1, 7] = float("-inf")  # -inf is still preferred over NaN
    num_free = n - len(nan_at) - 2 - 3  # finite non-forced tokens
    got = select_keep(scores, 2 + 3 + num_free, 2, 3)
    for h in range(4):
        assert not set(got[h].tolist()) & set(nan_at)
        assert got[h].tolist() == ref_select(scores[h].tolist(), 2 + 3 + num_free, 2, 3)
    # One more slot: only then does a NaN token get in.
    got = select_keep(scores, 2 + 3 + num_free + 1, 2, 3)
    for h in range(4):
        assert len(set(got[h].tolist()) & set(nan_at)) == 1
    # all-NaN rows still keep sinks and recent
    allnan = torch.full((2, 20), float("nan"))
    got = select_keep(allnan, 5, 2, 3)
    assert got.tolist() == [[0, 1, 17, 18, 19]] * 2


def test_select_keep_does_not_modify_scores():
    scores = torch.rand(2, 30)
    scores[0, 5] = float("nan")
    before = scores.clone()
    select_keep(scores, 10, 2, 3)
    torch.testing.assert_close(scores, before, equal_nan=True)


# ---------------------------------------------------------------- SnapKV ref
def ref_window_attention(keys, queries, query_pos, scale=None):
    """Explicit loops: per query head, per window query, softmax over visible keys."""
    hkv, n, d = keys.shape
    hq, w, _ = queries.shape
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(hkv, g, w, n, dtype=torch.float64)
    k64 = keys.double()
    q64 = queries.double()
    for qh in range(hq):
        kh = qh // g
        for i in range(w):
            p = int(query_pos[i])
            logits = [float(q64[qh, i] @ k64[kh, j]) * scale for j in range(p + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            s = sum(e)
            for j in range(p + 1):
                out[kh, qh % g, i, j] = e[j] / s
    return out


def ref_snapkv(keys, queries, query_pos, pool_kernel, scale=None):
    probs = ref_window_attention(keys, queries, query_pos, scale)
    hkv, g, w, n = probs.shape
    scores = torch.zeros(hkv, n, dtype=torch.float64)
    for h in range(hkv):
        for j in range(n):
            total = 0.0
            for qh in range(g):
                total += sum(float(probs[h, qh, i, j]) for i in range(w))
            scores[h, j] = total / g
    if pool_kernel == 1:
        return scores
    r = pool_kernel // 2
    pooled = torch.zeros_like(scores)
    for h in range(hkv):
        for j in range(n):
            lo, hi = max(0, j - r), min(n - 1, j + r)
            vals = [float(scores[h, t]) for t in range(lo, hi + 1)]
            pooled[h, j] = sum(vals) / len(vals)  # count_include_pad=False
    return pooled


def _inputs(hkv, ratio, n, w, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(hkv, n, d, generator=g).to(dtype)
    queries = torch.randn(hkv * ratio, w, d, generator=g).to(dtype)
    # window = the newest w tokens (in order), as the compactor sees it
    query_pos = torch.arange(n - w, n)
    return keys, queries, query_pos


CASES = [
    # hkv, ratio, n, w, d
    (2, 1, 23, 5, 16),
    (1, 3, 17, 4, 8),
    (2, 4, 31, 6, 16),
    (3, 3, 9, 9, 8),
]


@pytest.mark.parametrize("hkv, ratio, n, w, d", CASES)
def test_window_attention_matches_loop(hkv, ratio, n, w, d):
    keys, queries, qpos = _inputs(hkv, ratio, n, w, d, seed=n)
    got = window_attention(keys, queries, qpos)
    assert got.shape == (hkv, ratio, w, n)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_window_attention(keys, queries, qpos),
                               rtol=1e-5, atol=1e-6)
    # explicit scale
    got = window_attention(keys, queries, qpos, scale=0.05)
    torch.testing.assert_close(
        got.double(), ref_window_attention(keys, queries, qpos, 0.05), rtol=1e-5, atol=1e-6)
    # causal: nothing after each query's own token
    for i in range(w):
        assert torch.all(got[:, :, i, int(qpos[i]) + 1:] == 0)


def test_window_attention_arbitrary_positions_and_bf16():
    keys, queries, _ = _inputs(2, 3, 21, 4, 16, seed=5, dtype=torch.bfloat16)
    qpos = torch.tensor([0, 7, 7, 20])  # not contiguous, repeated, first token
    got = window_attention(keys, queries, qpos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_window_attention(keys, queries, qpos),
                               rtol=1e-5, atol=1e-6)
    assert torch.all(got[:, :, 0, 0] == 1)


def test_window_attention_rejects_bad_gqa():
    keys = torch.randn(3, 10, 8)
    queries = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        window_attention(keys, queries, torch.tensor([8, 9]))


@pytest.mark.parametrize("pool", [1, 5, 7])
@pytest.mark.parametrize("hkv, ratio, n, w, d", CASES + [(2, 4, 3, 2, 8)])
def test_snapkv_score_matches_loop(pool, hkv, ratio, n, w, d):
    keys, queries, qpos = _inputs(hkv, ratio, n, w, d, seed=100 + n)
    m = SnapKV(pool_kernel=pool)
    got = m.score(keys, queries, qpos)
    assert got.shape == (hkv, n)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_snapkv(keys, queries, qpos, pool),
                               rtol=1e-5, atol=1e-6)
    got = m.score(keys, queries, qpos, scale=0.3)
    torch.testing.assert_close(got.double(), ref_snapkv(keys, queries, qpos, pool, 0.3),
                               rtol=1e-5, atol=1e-6)


def test_snapkv_unpooled_scores_sum_to_window():
    keys, queries, qpos = _inputs(2, 4, 40, 8, 16, seed=9)
    s = SnapKV(pool_kernel=1).score(keys, queries, qpos)
    # each query's probabilities sum to 1; mean over the group keeps that
    torch.testing.assert_close(s.sum(dim=1), torch.full((2,), 8.0))


def test_snapkv_validation():
    for k in (0, 2, 4, -1):
        with pytest.raises(ValueError):
            SnapKV(pool_kernel=k)
    m = SnapKV()
    assert m.pool_kernel == 7 and m.needs_queries and m.name == "snapkv"
    keys = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="observation window"):
        m.score(keys)
    with pytest.raises(ValueError, match="observation window"):
        m.score(keys, torch.randn(2, 0, 8), torch.empty(0, dtype=torch.int64))


def test_snapkv_then_select_keep_picks_attended_tokens():
    # One token (index 10) that every window query aligns with strongly.
    d, n, w = 16, 50, 4
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, n, d, generator=g) * 0.01
    keys[0, 10] = 5.0
    queries = torch.ones(2, w, d)
    qpos = torch.arange(n - w, n)
    s = SnapKV(pool_kernel=1).score(keys, queries, qpos)
    keep = select_keep(s, 2 + 4 + 1, 2, 4)
    assert keep[0].tolist() == [0, 1, 10] + list(range(n - 4, n))


# ------------------------------------------------------------------ Streaming
@pytest.mark.parametrize("heads, n, sinks, recent, keep",
                         [(1, 20, 4, 8, 12), (3, 101, 4, 32, 50), (2, 33, 0, 5, 9)])
def test_streaming_keeps_sinks_and_most_recent(heads, n, sinks, recent, keep):
    m = StreamingLLM()
    assert not m.needs_queries and m.name == "streaming"
    keys = torch.randn(heads, n, 8)
    s = m.score(keys)
    assert s.shape == (heads, n) and s.dtype == torch.float32
    got = select_keep(s, keep, sinks, recent)
    expected = list(range(sinks)) + list(range(n - (keep - sinks), n))
    assert got.tolist() == [expected] * heads
    # position-only: works on an empty head dim too (as the compactor calls it)
    s2 = m.score(torch.empty(heads, n, 0))
    assert torch.equal(s, s2)


# ------------------------------------------------------------------- registry
def test_registry():
    names = available_methods()
    for n in ("none", "streaming", "snapkv"):
        assert n in names
    text = describe_methods()
    for n in names:
        assert n in text
    assert build_method(KVShrinkConfig(method="none")) is None
    s = build_method(KVShrinkConfig(method="streaming"))
    assert isinstance(s, StreamingLLM) and isinstance(s, ScoringMethod)
    k = build_method(KVShrinkConfig(method="snapkv", pool_kernel=5))
    assert isinstance(k, SnapKV) and k.pool_kernel == 5


def test_base_method_is_abstract():
    with pytest.raises(NotImplementedError):
        ScoringMethod().score(torch.zeros(1, 1, 1))


def test_avg_pool_reference_agrees_with_torch():
    # Sanity check of the reference's pooling definition itself.
    x = torch.rand(2, 13, dtype=torch.float64)
    ours = F.avg_pool1d(x[:, None], 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    for j in range(13):
        lo, hi = max(0, j - 2), min(12, j + 2)
        assert math.isclose(float(ours[0, j]), float(x[0, lo:hi + 1].mean()), rel_tol=1e-12)


def test_knorm_prefers_small_keys():
    from vllm_kvshrink.methods.knorm import KeyNorm

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 50, 16, generator=g)
    scores = KeyNorm().score(keys)
    ref = torch.stack([torch.tensor([-float(keys[h, i].norm()) for i in range(50)])
                       for h in range(3)])
    torch.testing.assert_close(scores, ref)
    keep = select_keep(scores, 20, 2, 4)
    norms = keys.norm(dim=-1)
    for h in range(3):
        middle = [i for i in range(2, 46)]
        chosen = [i for i in keep[h].tolist() if 2 <= i < 46]
        want = sorted(sorted(middle, key=lambda i: float(norms[h, i]))[:14])
        assert chosen == want
