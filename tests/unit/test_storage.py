"""Storage forms and the tier policy: exact bytes, round-trip error within the
stated bound, the budget always holds, sinks and recent tokens stay bf16,
demotion only."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.policy import cadence
from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError
from vllm_kvshrink.kernels.hadamard import hadamard, rotate
from vllm_kvshrink.storage import form_names, get_form, parse_storage
from vllm_kvshrink.storage.policy import (
    EVICTED,
    apply_tiers,
    held_bytes,
    levels_for,
    plan_tiers,
)
from vllm_kvshrink.storage.quantized import IntForm

# The integer forms (the low-rank forms have their own bound and tests,
# tests/research/test_lowrank_form.py).
QUANT = [n for n in form_names() if isinstance(get_form(n), IntForm)]


def _kv(a=6, n=37, d=64, seed=0, outlier=True):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(a, n, d, generator=g)
    v = torch.randn(a, n, d, generator=g)
    if outlier:  # key outlier channels, as real keys have
        k[:, :, 3] *= 12
        k[:, :, 40] += 5
    return k, v


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("n", [1, 7, 32, 37, 64])
def test_roundtrip_within_bound(name, n):
    f = get_form(name)
    k, v = _kv(n=n)
    kh, vh = f.roundtrip(k, v)
    assert kh.shape == k.shape and kh.dtype == k.dtype
    kr, vr = (rotate(k), rotate(v)) if f.rotate else (k, v)
    khr, vhr = (rotate(kh), rotate(vh)) if f.rotate else (kh, vh)
    kb = IntForm(f.bits, f.key_axis, key_group=f.key_group).error_bound(kr, f.key_axis)
    vb = IntForm(f.value_bits, "token").error_bound(vr, "token")
    tol = 1e-4 if f.rotate else 0.0  # the rotation's float32 arithmetic
    assert bool(((khr - kr).abs() <= kb + tol).all()), name
    assert bool(((vhr - vr).abs() <= vb + tol).all()), name


def test_roundtrip_keeps_dtype_and_bf16_is_identity():
    k, v = _kv()
    kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
    out = get_form("int4_tok_rot").roundtrip(kb, vb)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.bfloat16
    same = get_form("bf16").roundtrip(k, v)
    assert same[0] is k and same[1] is v


def test_more_bits_less_error_and_rotation_helps_outliers():
    k, v = _kv(n=256)

    def err(name):
        kh, _ = get_form(name).roundtrip(k, v)
        return float((kh - k).norm() / k.norm())

    assert err("int8_tok") < err("int4_tok") < err("int2_tok")
    assert err("int4_tok_rot") < err("int4_tok")  # outlier channels spread


def test_exact_bytes_by_hand():
    d = 64
    # per-token keys and values: codes + bf16 scale + bf16 zero, per token
    assert get_form("int4_tok").nbytes(10, d) == 10 * 2 * (32 + 4)
    assert get_form("int8_tok_rot").nbytes(3, d) == 3 * 2 * (64 + 4)
    assert get_form("k4v2_tok").nbytes(5, d) == 5 * ((32 + 4) + (16 + 4))
    # KIVI keys: every started group of 32 tokens pays 32 codes per channel
    # and its scale and zero per channel
    assert get_form("int4").nbytes(32, d) == 32 * 36 + d * (16 + 4)
    assert get_form("int4").nbytes(33, d) == 33 * 36 + 2 * d * (16 + 4)
    assert get_form("int2").nbytes(64, d) == 64 * 20 + 2 * d * (8 + 4)
    assert get_form("bf16").nbytes(7, d) == 7 * 256
    assert get_form("int4").bytes_per_token(d) == 76.0
    for name in form_names():
        assert get_form(name).nbytes(0, d) == 0


@pytest.mark.parametrize("name", form_names())
@pytest.mark.parametrize("d,bs", [(64, 32), (128, 16), (64, 128)])
def test_tokens_per_page_is_the_most_that_fit(name, d, bs):
    f = get_form(name)
    n = f.tokens_per_page(d, bs)
    page = bs * 2 * d * 2
    assert f.nbytes(n, d) <= page < f.nbytes(n + 1, d)


def test_hadamard_orthonormal_and_power_of_two():
    h = hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(96)


def test_parse_storage_errors_name_setting_value_and_allowed():
    assert parse_storage("int4_tok_rot, bf16") == ("bf16", "int4_tok_rot")
    with pytest.raises(ValueError, match=r"VLLM_KVSHRINK_STORAGE='bf16,int3'.*int3.*allowed"):
        parse_storage("bf16,int3")
    with pytest.raises(ValueError, match="vLLM format"):
        parse_storage("int4_per_token_head")
    with pytest.raises(ValueError, match="twice"):
        parse_storage("int4,int4")
    with pytest.raises(ValueError, match="names no form"):
        parse_storage("")


def test_config_storage_validation():
    assert not KVShrinkConfig(method="snapkv").tiered
    cfg = KVShrinkConfig(method="snapkv", storage="bf16,int4", budget=0.25)
    assert cfg.tiered and cfg.storage == ("bf16", "int4")
    with pytest.raises(KVShrinkConfigError, match="VLLM_KVSHRINK_BUDGET=512 is a token count"):
        KVShrinkConfig(method="snapkv", storage="bf16,int4", budget=512)
    with pytest.raises(KVShrinkConfigError, match="merging"):
        KVShrinkConfig(method="semantic", storage="int4", budget=0.25)
    with pytest.raises(KVShrinkConfigError, match="keeps keys per channel"):
        cfg.check_servable()  # per-channel keys cannot be paged
    KVShrinkConfig(method="snapkv", storage="bf16,int4_tok_rot,int2_tok",
                   budget=0.25).check_servable()  # token-axis forms are served


def test_request_override_storage_is_validated():
    base = KVShrinkConfig(method="snapkv")
    with pytest.raises(KVShrinkConfigError, match=r"extra_args\['kvshrink'\]\['storage'\]"):
        base.with_overrides({"storage": "bf16,int9"})
    ok = base.with_overrides({"storage": ["int4_tok_rot"]})
    assert ok.storage == ("int4_tok_rot",)


def test_env_storage(monkeypatch):
    monkeypatch.setenv("VLLM_KVSHRINK_STORAGE", "bf16,int2_rot")
    monkeypatch.setenv("VLLM_KVSHRINK_METHOD", "tova")
    cfg = KVShrinkConfig.from_env()
    assert cfg.storage == ("bf16", "int2_rot")
    monkeypatch.setenv("VLLM_KVSHRINK_STORAGE", "fp4")
    with pytest.raises(KVShrinkConfigError, match="VLLM_KVSHRINK_STORAGE='fp4'"):
        KVShrinkConfig.from_env()


# ---------------------------------------------------------------- policy
def _scores(l=3, h=2, n=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(l, h, n, generator=g) ** 6


STORAGES = [("int4_tok_rot",), ("bf16", "int4_tok_rot"), ("bf16", "int4"),
            ("bf16", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot"), ("int2",)]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("frac", [0.5, 0.25, 0.125])
def test_policy_budget_holds_and_protects(storage, frac):
    l, h, n, d = 3, 2, 300, 64
    s = _scores(l, h, n)
    lv = levels_for(storage)
    budget = int(frac * l * h * n * 4 * d)
    dist = [0.0] + [0.05 * i for i in range(1, len(lv))]
    p = plan_tiers(s, lv, budget, d, 4, 32, dist, bf16_free="bf16" in storage)
    assert p.nbytes == held_bytes(p.level, lv, d) <= budget
    assert bool((p.level[:, :, :4] == 0).all()) and bool((p.level[:, :, -32:] == 0).all())
    for i in range(len(lv)):  # the same count in every (layer, head)
        c = (p.level == i).sum(-1)
        assert bool((c == c.flatten()[0]).all()) and int(c[0, 0]) == p.counts[i]
    if "bf16" not in storage:
        assert p.counts[0] == 36
    # within a (layer, head), a more precise level never holds a lower score
    free = p.level[:, :, 4:-32].long()
    sc = s[:, :, 4:-32]
    rank = torch.where(free == EVICTED, len(lv), free)
    for a in range(l):
        for b in range(h):
            order = torch.argsort(sc[a, b], descending=True)
            assert bool((rank[a, b][order].diff() >= 0).all())


def test_policy_reports_what_it_minimises_and_a_price_on_kept_tokens_trades_it():
    """``plan.distortion`` is the weighted distortion of the plan's counts
    (recomputed here from the sorted, normalised scores); a price on kept
    tokens keeps fewer, within the budget, at a distortion no lower, and
    price 0 is the plan both paths run."""
    l, h, n, d = 3, 2, 300, 64
    s = _scores(l, h, n, seed=5)
    lv = levels_for(("bf16", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot"))
    budget, dist = int(0.25 * l * h * n * 4 * d), [0.0, 0.01, 0.12, 0.6]
    base = plan_tiers(s, lv, budget, d, 4, 32, dist)
    free = s[:, :, 4:-32]
    w = torch.sort(free / free.sum(-1, keepdim=True), -1, descending=True).values.mean((0, 1))
    runs = torch.repeat_interleave(torch.tensor(dist + [1.0]), torch.tensor(
        [base.counts[0] - 36] + base.counts[1:] + [n - sum(base.counts)]))
    assert base.distortion == pytest.approx(float((w.double() * runs).sum()), rel=1e-5)
    assert torch.equal(plan_tiers(s, lv, budget, d, 4, 32, dist, keep_cost=0.0).level,
                       base.level)
    last = base
    for price in (0.2, 1.0, 4.0):
        p = plan_tiers(s, lv, budget, d, 4, 32, dist, keep_cost=price)
        assert p.nbytes <= budget
        assert sum(p.counts) <= sum(last.counts) and p.distortion >= last.distortion - 1e-9
        last = p
    assert sum(last.counts) < sum(base.counts)
    with pytest.raises(ValueError, match="keep_cost"):
        plan_tiers(s, lv, budget, d, 4, 32, dist, keep_cost=-1.0)


@pytest.mark.parametrize("n", [150, 300, 700])
def test_a_plan_counting_whole_blocks_fits_them(n):
    """``page_tokens``: every level's tokens rounded up to its blocks fit the
    budget rounded up to whole blocks (what eviction's token budget holds),
    where the byte plan's partly filled pages may not; bad counts are refused."""
    from vllm_kvshrink.storage.geometry import TierGeometry

    l, h, d, bs = 3, 2, 64, 32
    lv = levels_for(("bf16", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot"))
    geo = TierGeometry(l, h, d, bs, 2)
    pages = [geo.capacity(name) for name in lv]
    s, dist = _scores(l, h, n, seed=n), [0.0, 0.01, 0.12, 0.6]
    budget = int(0.25 * n) * l * h * 2 * d * 2  # a quarter of the tokens' bf16 bytes
    allowed = -(-budget // (l * h * bs * 2 * d * 2))
    blocks = lambda p: sum(-(-c // k) for c, k in zip(p.counts, pages))  # noqa: E731
    by_bytes = plan_tiers(s, lv, budget, d, 4, 32, dist)
    by_blocks = plan_tiers(s, lv, budget, d, 4, 32, dist, page_tokens=pages)
    assert blocks(by_blocks) <= allowed and by_bytes.nbytes <= budget
    assert blocks(by_bytes) >= blocks(by_blocks)
    with pytest.raises(ValueError, match="page_tokens"):
        plan_tiers(s, lv, budget, d, 4, 32, dist, page_tokens=pages[:2])


def test_policy_demotes_only():
    l, h, n, d = 2, 2, 200, 64
    lv = levels_for(("bf16", "int8_tok", "int4_tok", "int2_tok"))
    s = _scores(l, h, n, seed=3)
    current = torch.zeros(l, h, n, dtype=torch.int8)
    current[:, :, 10:100] = 2  # already int4: may stay, go to int2 or be evicted
    dist = [0.0, 0.001, 0.01, 0.2]
    p = plan_tiers(s, lv, int(0.6 * l * h * n * 4 * d), d, 4, 32, dist, current=current)
    kept = p.level != EVICTED
    assert bool((p.level[kept] >= current[kept]).all())
    assert p.nbytes <= int(0.6 * l * h * n * 4 * d)


def test_policy_refuses_a_budget_below_the_protected_tokens():
    with pytest.raises(ValueError, match="exceed the byte budget"):
        plan_tiers(_scores(), levels_for(("int4",)), 1000, 64, 4, 32, [0.0, 0.1])


def test_apply_tiers_holds_each_level_as_its_form():
    l, h, n, d = 2, 3, 120, 64
    k = torch.randn(l, h, n, d)
    v = torch.randn(l, h, n, d)
    lv = levels_for(("bf16", "int4_tok_rot"))
    p = plan_tiers(_scores(l, h, n), lv, int(0.3 * l * h * n * 4 * d), d, 4, 16,
                   [0.0, 0.08])
    keep = p.keep()
    kk, vv = apply_tiers(p, k, v, keep)
    lev = p.level.gather(2, keep)
    f = get_form("int4_tok_rot")
    for a in range(l):
        for b in range(h):
            src = keep[a, b]
            q = lev[a, b] == 1
            ek, ev_ = f.roundtrip(k[a, b, src[q]][None], v[a, b, src[q]][None])
            torch.testing.assert_close(kk[a, b, q], ek[0])
            torch.testing.assert_close(vv[a, b, q], ev_[0])
            torch.testing.assert_close(kk[a, b, ~q], k[a, b, src[~q]])


# ---------------------------------------------------------------- schedule
def test_schedule_tokens_and_bytes():
    cfg = KVShrinkConfig(method="snapkv", budget=0.25, slack_tokens=64)
    # 1000 tokens: budget 250 -> 256 (blocks of 32); due only past 256 + 64
    assert cadence.tokens_to_keep(cfg, 320, 1000, 1000, 32) is None
    assert cadence.tokens_to_keep(cfg, 321, 1000, 1000, 32) == 256
    t = KVShrinkConfig(method="snapkv", budget=0.25, slack_tokens=64, storage="int4")
    tb = 100
    assert cadence.budget_bytes(t, 1000, tb) == 25000
    assert cadence.bytes_due(t, 25000 + 64 * tb, 1000, 1000, tb) is None
    assert cadence.bytes_due(t, 25000 + 64 * tb + 1, 1000, 1000, tb) == 25000
    # no bf16 in the storage: loose bf16 tokens past the slack are packed
    # even under budget (KIVI's residual)
    full = KVShrinkConfig(method="streaming", budget=1.0, slack_tokens=64, storage="int4")
    assert cadence.bytes_due(full, 50000, 1000, 1000, tb, loose_bf16=64) is None
    assert cadence.bytes_due(full, 50000, 1000, 1000, tb, loose_bf16=65) == 100000


def test_prompt_waits_while_its_rest_fits_budget_slack_and_chunk():
    """A request still prefilling is compressed only once what it holds plus
    the rest of its prompt passes the budget at the prompt's end, the slack
    and one chunk (cadence.waits_for_prompt), in tokens and in bytes; without
    a chunk (one pass) or once the prompt is done, the plain rule applies."""
    cfg = KVShrinkConfig(method="snapkv", budget=0.25, slack_tokens=64)
    # held = seen = 400 of a prompt P: it waits while P <= ceil(P / 4) + 64 + 1024,
    # i.e. up to P = 1451 (363 + 1088)
    assert cadence.tokens_to_keep(cfg, 400, 400, 1451, 32) == 128  # no chunk: as before
    assert cadence.tokens_to_keep(cfg, 400, 400, 1451, 32, chunk_tokens=1024) is None
    assert cadence.tokens_to_keep(cfg, 400, 400, 1452, 32, chunk_tokens=1024) == 128
    assert cadence.tokens_to_keep(cfg, 401, 400, 1451, 32, chunk_tokens=1024) == 128
    # the prompt done: the plain rule, whatever the chunk
    assert cadence.tokens_to_keep(cfg, 1500, 1500, 1500, 32, chunk_tokens=4096) == 384
    t = KVShrinkConfig(method="snapkv", budget=0.25, slack_tokens=64, storage="int4")
    tb = 100
    # in bytes: 40000 + (P - 400) * 100 <= 25 P + 108800 up to P = 1450
    assert cadence.bytes_due(t, 40000, 400, 1450, tb) == 10000
    assert cadence.bytes_due(t, 40000, 400, 1450, tb, chunk_tokens=1024) is None
    assert cadence.bytes_due(t, 40000, 400, 1451, tb, chunk_tokens=1024) == 10000
    assert cadence.waits_for_prompt(t, 40000, 36250, 400, 1450, 1024, tb)
    assert not cadence.waits_for_prompt(t, 40000, 36250, 400, 1450, None, tb)


def test_list_shows_forms_at_the_models_shape(capsys, model_path):
    from vllm_kvshrink.__main__ import main

    assert main(["--list", "--model", model_path]) == 0
    out = capsys.readouterr().out
    # SmolLM2-135M: 30 layers x 3 KV heads x head_dim 64 -> 23,040 B/token in bf16
    assert "23,040 bytes of bf16 K+V per token" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert "6,480 B/token" in lines["int4_tok_rot"]
    assert "6,480 B/token" in lines["int4_per_token_head"]
    assert "113 tokens per 32-token page" in lines["int4_tok_rot"]
    assert "turboquant_4bit_nc" in out and "VLLM_KVSHRINK_STORAGE" in out


def test_engine_refuses_what_it_cannot_serve_at_start(monkeypatch):
    """Per-channel forms cannot be paged; a tiered storage needs a method."""
    import vllm_kvshrink

    monkeypatch.setattr(vllm_kvshrink, "_REGISTERED", False)
    monkeypatch.setenv("VLLM_KVSHRINK_STORAGE", "bf16,int4")
    monkeypatch.setenv("VLLM_KVSHRINK_METHOD", "snapkv")
    monkeypatch.setenv("VLLM_KVSHRINK_BUDGET", "0.25")
    with pytest.raises(KVShrinkConfigError, match="form 'int4' keeps keys per channel"):
        vllm_kvshrink.register()
    monkeypatch.setenv("VLLM_KVSHRINK_STORAGE", "bf16,int4_tok")
    monkeypatch.setenv("VLLM_KVSHRINK_METHOD", "none")
    with pytest.raises(KVShrinkConfigError, match="needs an importance method"):
        vllm_kvshrink.register()


def test_attention_distortion_orders_forms_and_matches_a_direct_computation():
    from vllm_kvshrink.methods.base import Observation
    from vllm_kvshrink.storage.policy import attention_distortion

    g = torch.Generator().manual_seed(5)
    l, h, hq, n, d, w = 2, 2, 4, 96, 64, 8
    keys = torch.randn(l, h, n, d, generator=g)
    values = torch.randn(l, h, n, d, generator=g)
    q = torch.randn(l, hq, w, d, generator=g) * 2
    qpos = torch.arange(n - w, n)
    obs = Observation(keys, q, qpos, [d**-0.5] * l)
    lv = ["bf16", "int8_tok", "int4_tok", "int2_tok"]
    dist = attention_distortion(obs, values, lv, 4, 16)
    assert dist[0] == 0.0 and 0 < dist[1] < dist[2] < dist[3] <= 1.0
    # int4 by hand: every unprotected token quantized, against evicting them
    prot = torch.zeros(n, dtype=torch.bool)
    prot[:4] = True
    prot[-16:] = True

    def attn(k, v, mask):
        lg = torch.einsum("lhgwd,lhnd->lhgwn", q.view(l, h, 2, w, d), k) * d**-0.5
        vis = (torch.arange(n)[None, :] <= qpos[:, None]) & mask[None, :]
        return torch.einsum("lhgwn,lhnd->lhgwd",
                            torch.softmax(lg.masked_fill(~vis, float("-inf")), -1), v)

    every = torch.ones(n, dtype=torch.bool)
    ref = attn(keys, values, every)
    kq, vq = get_form("int4_tok").roundtrip(keys.reshape(-1, n, d), values.reshape(-1, n, d))
    kq = torch.where(prot[None, :, None], keys.reshape(-1, n, d), kq).view_as(keys)
    vq = torch.where(prot[None, :, None], values.reshape(-1, n, d), vq).view_as(values)
    want = (attn(kq, vq, every) - ref).norm() / (attn(keys, values, prot) - ref).norm()
    assert dist[2] == pytest.approx(float(want), rel=1e-5)
    assert attention_distortion(Observation(keys), values, lv, 4, 16) is None


def test_form_distortion_is_measured_first_and_again_once_the_cache_has_grown():
    from vllm_kvshrink.methods.base import Observation
    from vllm_kvshrink.storage import policy

    g = torch.Generator().manual_seed(6)
    lv = ["bf16", "int8_tok", "int4_tok"]

    def obs(n):
        keys = torch.randn(2, 2, n, 64, generator=g)
        q = torch.randn(2, 4, 8, 64, generator=g)
        return Observation(keys, q, torch.arange(n - 8, n), [0.125] * 2), keys * 0.5

    memo = {}
    o, v = obs(100)
    first = policy.form_distortion(o, v, lv, 4, 16, memo)
    assert first == policy.attention_distortion(o, v, lv, 4, 16)
    assert memo == {"levels": tuple(lv), "tokens": 100, "distortion": first}
    o2, v2 = obs(124)  # < 1.25x the tokens measured: reused
    assert policy.form_distortion(o2, v2, lv, 4, 16, memo) == first
    assert first != policy.attention_distortion(o2, v2, lv, 4, 16)
    o3, v3 = obs(125)  # grown by the factor: measured again
    third = policy.form_distortion(o3, v3, lv, 4, 16, memo)
    assert third == policy.attention_distortion(o3, v3, lv, 4, 16) and memo["tokens"] == 125
    # other forms, or no memo: measured
    assert policy.form_distortion(o3, v3, lv[:2], 4, 16, memo) != third
    assert policy.form_distortion(o2, v2, lv, 4, 16) != first


def test_apply_tiers_leaves_tokens_that_stay_in_a_token_local_form_as_they_are():
    """A second event: tokens already held in int8_tok_rot that stay there
    keep their values bit for bit (the engine leaves their bytes alone);
    tokens entering it are stored from what they hold now."""
    l, h, n, d = 2, 3, 120, 64
    torch.manual_seed(1)
    k = torch.randn(l, h, n, d) * 3 + 1
    v = torch.randn(l, h, n, d)
    lv = levels_for(("bf16", "int8_tok_rot"))
    f = get_form("int8_tok_rot")
    current = torch.zeros(l, h, n, dtype=torch.int8)
    current[:, :, 10:60] = 1  # held in int8 since an earlier event
    k_held, v_held = k.clone(), v.clone()
    rk, rv = f.roundtrip(k[:, :, 10:60].reshape(-1, 50, d), v[:, :, 10:60].reshape(-1, 50, d))
    k_held[:, :, 10:60], v_held[:, :, 10:60] = rk.view(l, h, 50, d), rv.view(l, h, 50, d)
    p = plan_tiers(_scores(l, h, n), lv, int(0.3 * l * h * n * 4 * d), d, 4, 16,
                   [0.0, 0.08], current=current)
    keep = p.keep()
    kk, vv = apply_tiers(p, k_held, v_held, keep, current)
    lev, was = p.level.gather(2, keep), current.gather(2, keep)
    stay, enter = (lev == 1) & (was == 1), (lev == 1) & (was == 0)
    assert bool(stay.any()) and bool(enter.any())
    src = keep[..., None].expand(-1, -1, -1, d)
    held_k, held_v = k_held.gather(2, src), v_held.gather(2, src)
    assert torch.equal(kk[stay], held_k[stay]) and torch.equal(vv[stay], held_v[stay])
    for a in range(l):
        for b in range(h):
            e = enter[a, b]
            ek, ev_ = f.roundtrip(held_k[a, b, e][None], held_v[a, b, e][None])
            torch.testing.assert_close(kk[a, b, e], ek[0])
            torch.testing.assert_close(vv[a, b, e], ev_[0])
    # Stored again as a whole, int8 codes drift (the bf16 scale is not
    # recovered exactly from dequantized values): the rule matters.
    again, _ = f.roundtrip(held_k[stay][None], held_v[stay][None])
    assert not torch.equal(again[0], held_k[stay])


def test_bytes_actually_held_counts_plain_tokens_at_the_caches_element_size():
    from vllm_kvshrink.storage.geometry import TierGeometry

    segments = [(3, "int4_tok_rot", 10), (4, "int2_tok_rot", 5)]
    bf16 = TierGeometry(2, 3, 64, 16, 2)
    fp32 = TierGeometry(2, 3, 64, 16, 4)
    rows = 2 * 3
    # plain tokens: K and V, 64 elements each, per row, at 2 or 4 bytes
    assert bf16.bytes_actually_held(7, segments)["bf16"] == rows * 7 * 2 * 64 * 2
    assert fp32.bytes_actually_held(7, segments)["bf16"] == rows * 7 * 2 * 64 * 4
    assert fp32.plain_token_bytes == 2 * bf16.plain_token_bytes == 2 * bf16.token_bytes
    # packed forms hold the same codes and parameters in either cache, and
    # budgets (held_bytes) stay in bf16 bytes so both dtypes compress alike
    for form, n in (("int4_tok_rot", 10), ("int2_tok_rot", 5)):
        want = rows * get_form(form).nbytes(n, 64)
        assert bf16.bytes_actually_held(7, segments)[form] == want
        assert fp32.bytes_actually_held(7, segments)[form] == want
    assert fp32.held_bytes(7, segments) == bf16.held_bytes(7, segments) \
        == sum(bf16.bytes_actually_held(7, segments).values())
