"""The ``adaptive`` method: per request and layer, the candidate scorer whose
top tokens caught most of the held-out window queries' attention.

Synthetic caches are built so one candidate is plainly right on a layer (the
window queries attend to large-norm keys: SnapKV's window signal sees them,
key-norm ranks them last; or the held-out queries turn to small-norm keys the
first-part queries ignored: key-norm is right, SnapKV is not).  Then the real
model through the research path, eviction and tiered storage.
"""

from __future__ import annotations


import pytest
import torch

from vllm_kvshrink.config import KVShrinkConfig, KVShrinkConfigError
from vllm_kvshrink.methods import (
    Observation,
    adaptive_candidates,
    available_methods,
    base_names,
    build_method,
    compress_event,
    describe_methods,
    is_servable,
    parse_method,
)
from vllm_kvshrink.methods.adaptive import EXCLUDED, AdaptiveSelect
from vllm_kvshrink.methods.base import select_keep
from vllm_kvshrink.methods.ema import EMAAttention
from vllm_kvshrink.methods.knorm import KeyNorm
from vllm_kvshrink.methods.snapkv import SnapKV

N, W, D, HKV, G = 64, 8, 8, 2, 2
A = list(range(10, 22))  # large-norm keys along e1
B = list(range(30, 42))  # small-norm keys along e0


def crafted(kinds, seed=0):
    """One layer per entry of ``kinds``: ``"snapkv"`` (every window query
    attends to A) or ``"knorm"`` (the first part attends to A, the held-out
    queries to B)."""
    gen = torch.Generator().manual_seed(seed)
    l = len(kinds)
    keys = torch.zeros(l, HKV, N, D)
    rest = torch.randn(l, HKV, N, D - 2, generator=gen)
    keys[..., 2:] = 4 * rest / rest.norm(dim=-1, keepdim=True)  # norm 4, _|_ e0, e1
    keys[:, :, A] = 0.0
    keys[:, :, A, 1] = 4.0
    keys[:, :, B] = 0.0
    keys[:, :, B, 0] = 0.5
    q = 0.05 * torch.randn(l, HKV * G, W, D, generator=gen)
    h = max(1, W // 4)
    for i, kind in enumerate(kinds):
        q[i, :, :, 1] += 6.0
        if kind == "knorm":
            q[i, :, W - h:, 1] -= 6.0
            q[i, :, W - h:, 0] += 40.0
    return Observation(keys, q, torch.arange(N - W, N), [D**-0.5] * l)


def fresh(obs: Observation) -> Observation:
    return Observation(obs.keys.clone(), obs.queries.clone(), obs.query_pos.clone(),
                       list(obs.scales), values=obs.values)


def adaptive(scorers, **args):
    cfg = KVShrinkConfig(method="adaptive",
                         method_args={"adaptive_scorers": scorers, **args})
    m = build_method(cfg)
    assert isinstance(m, AdaptiveSelect)
    return m


# ------------------------------------------------------------------ choices
@pytest.mark.parametrize("scorers", ["snapkv,knorm", "knorm,snapkv"])
def test_picks_the_candidate_that_predicts_the_held_out_queries(scorers):
    obs = crafted(["snapkv", "knorm"])
    m = adaptive(scorers)
    state = {}
    scores = m.score_layers(obs, state)
    ev = state["_event"]
    assert ev["choice"] == ["snapkv", "knorm"]
    cov = ev["coverage"]
    assert cov["snapkv"][0] > 0.9 and cov["knorm"][0] < 0.1
    assert cov["knorm"][1] > 0.9 and cov["snapkv"][1] < 0.1
    # Each layer returns its candidate's scores from the FULL window.
    torch.testing.assert_close(scores[0], SnapKV().score_layers(fresh(obs), {})[0])
    torch.testing.assert_close(scores[1], KeyNorm().score_layers(fresh(obs), {})[1])


def test_choice_differs_per_layer_and_follows_the_layers():
    m = adaptive("snapkv,knorm")
    st = {}
    compress_event(m, crafted(["knorm", "snapkv", "knorm"]), st, 24, 4, 8)
    assert st["choice"] == ["knorm", "snapkv", "knorm"]
    s = m.summary()
    assert s["choices"] == {"snapkv": 1, "knorm": 2}
    assert s["events"] == s["measured_events"] == 1
    assert 0 < s["entropy"] < 1
    assert set(s["coverage"]) == {"snapkv", "knorm"}


def test_ties_go_to_the_first_listed():
    obs = crafted(["snapkv", "knorm"])
    m = AdaptiveSelect([("a", KeyNorm()), ("b", KeyNorm())])
    st = {}
    compress_event(m, obs, st, 24, 4, 8)
    assert st["choice"] == ["a", "a"]


def test_running_accuracy_weighs_the_past():
    # Event 1 says knorm on layer 0; event 2 says snapkv: with decay 0.9 the
    # past still wins, with decay 0.1 the new evidence does.
    for decay, want in ((0.9, "knorm"), (0.1, "snapkv")):
        m = adaptive("snapkv,knorm", adaptive_decay=decay)
        st = {}
        compress_event(m, crafted(["knorm"]), st, N, 4, 8)  # keeps everything
        cov1 = {k: v[0] for k, v in m.events[-1]["coverage"].items()}
        compress_event(m, crafted(["snapkv"], seed=1), st, N, 4, 8)
        cov2 = {k: v[0] for k, v in m.events[-1]["coverage"].items()}
        acc = {k: decay * cov1[k] + (1 - decay) * cov2[k] for k in cov1}
        assert st["acc"][:, 0].tolist() == pytest.approx([acc["snapkv"], acc["knorm"]])
        assert st["choice"] == [want], decay


def test_window_of_one_query_scores_without_a_check():
    obs = crafted(["snapkv", "knorm"])
    obs = Observation(obs.keys, obs.queries[:, :, -1:], obs.query_pos[-1:], obs.scales)
    m = adaptive("knorm,snapkv")
    st = {}
    res = compress_event(m, obs, st, 24, 4, 8)
    assert st["choice"] == ["knorm", "knorm"] and "acc" not in st
    assert m.summary()["measured_events"] == 0 and m.summary()["entropy"] is not None
    assert res.keep.shape == (2, HKV, 24)


def test_tokens_outside_the_key_mask_are_never_picked():
    # The promotion view spans every logical position; gone tokens read as
    # zero keys, which key-norm would rank first.
    obs = crafted(["knorm"])
    gone = list(range(44, 56))
    obs.keys[:, :, gone] = 0.0
    obs.key_mask = torch.ones(1, HKV, N, dtype=torch.bool)
    obs.key_mask[:, :, gone] = False
    m = adaptive("snapkv,knorm", adaptive_frac=0.3)  # k = ceil(0.3 * 40) = 12
    st = {}
    m.score_layers(obs, st)
    assert st["_event"]["choice"] == ["knorm"]
    assert st["_event"]["coverage"]["knorm"][0] > 0.9


# -------------------------------------------------------------- determinism
def obs_with_values(seed, l=3, n=80, w=12, d=16, hkv=2, g=3):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(l, hkv, n, d, generator=gen)
    q = torch.randn(l, hkv * g, w, d, generator=gen) * 2
    vals = torch.randn(l, hkv, n, d, generator=gen)
    return Observation(keys, q, torch.arange(n - w, n), [d**-0.5] * l, values=vals)


def test_two_fresh_instances_make_identical_choices_and_scores():
    scorers = "snapkv,expected_attention,ema,temporal,h2o,tova,knorm"
    runs = []
    for _ in range(2):
        m = adaptive(scorers)
        assert m.candidates[3][1].online is False  # temporal offline by default
        st, out = {}, []
        for seed in (1, 2):
            obs = obs_with_values(seed)
            s = m.score_layers(obs, st)
            keep = select_keep(s.reshape(-1, s.shape[-1]), 40, 4, 12).view(3, 2, -1)
            m.update(st, keep)
            out.append((s, keep, list(st["choice"])))
        runs.append((out, m.summary()))
    (a, sa), (b, sb) = runs
    for (s1, k1, c1), (s2, k2, c2) in zip(a, b):
        assert torch.equal(s1, s2) and torch.equal(k1, k2) and c1 == c2
    assert sa == sb


# -------------------------------------------------------------------- state
def grow(obs: Observation, keep: torch.Tensor, extra: int, seed: int) -> Observation:
    """The cache after ``keep``, with ``extra`` new tokens whose queries form
    the next window."""
    gen = torch.Generator().manual_seed(seed)
    l, h, _, d = obs.keys.shape
    kept = obs.keys.gather(2, keep[..., None].expand(-1, -1, -1, d))
    keys = torch.cat([kept, torch.randn(l, h, extra, d, generator=gen)], dim=2)
    q = torch.randn(l, obs.queries.shape[1], extra, d, generator=gen) * 2
    n = keys.shape[2]
    return Observation(keys, q, torch.arange(n - extra, n), list(obs.scales))


def test_state_carries_through_update_across_events():
    m = adaptive("snapkv,ema", ema_decay=0.8)
    ema = EMAAttention(0.8)
    st, ref = {}, {}
    obs = obs_with_values(3, n=60, w=12)
    for event in range(3):
        s_ref = ema.score_layers(fresh(obs), ref)
        res = compress_event(m, obs, st, 32, 4, 12)
        ema.update(ref, res.keep)
        # The nested ema state is the standalone ema's, token for token.
        torch.testing.assert_close(st["sub"]["ema"]["ema"], ref["ema"])
        assert st["sub"]["ema"]["n"] == ref["n"] == 32 == st["n"]
        for i, name in enumerate(st["choice"]):
            if name == "ema":
                torch.testing.assert_close(res.scores[i], s_ref[i])
        assert "_sub" not in st and "_ema" not in st["sub"]["ema"]
        obs = grow(obs, res.keep, 12, seed=10 + event)  # extend_state: 12 new tokens
    assert m.summary()["events"] == 3


def test_single_candidate_is_that_candidate():
    m, ema = adaptive("ema"), EMAAttention()
    st, ref = {}, {}
    obs = obs_with_values(4, n=60, w=12)
    for event in range(2):
        a = compress_event(m, obs, st, 32, 4, 12)
        b = compress_event(ema, fresh(obs), ref, 32, 4, 12)
        assert torch.equal(a.keep, b.keep) and torch.equal(a.scores, b.scores)
        obs = grow(obs, a.keep, 12, seed=20 + event)


def test_a_shallow_copy_of_the_state_is_never_written_through():
    # The engine scores on dict(state) so that a failed event leaves the
    # request's state as it was.
    m = adaptive("snapkv,ema,h2o")
    st = {}
    obs = obs_with_values(5, n=60, w=12)
    res = compress_event(m, obs, st, 32, 4, 12)
    before = {k: dict(v) for k, v in st["sub"].items()}
    acc = st["acc"].clone()
    work = dict(st)
    m.score_layers(grow(obs, res.keep, 12, seed=7), work)  # no update: "failed"
    assert {k: dict(v) for k, v in st["sub"].items()}.keys() == before.keys()
    for name, sub in st["sub"].items():
        assert sub.keys() == before[name].keys()
        for k, v in sub.items():
            assert v is before[name][k]
    assert torch.equal(st["acc"], acc) and "_sub" not in st


# ----------------------------------------------------------------- registry
def test_registry_and_arguments():
    assert "adaptive" in available_methods() and is_servable("adaptive")
    assert "adaptive+semantic" not in available_methods()
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("adaptive+semantic")
    assert adaptive_candidates() == [n for n in base_names() if n not in EXCLUDED]
    assert "adaptive_scorers" in describe_methods()
    m = build_method(KVShrinkConfig(method="adaptive"))
    assert m.names == ["snapkv", "expected_attention", "ema"]
    assert (m.decay, m.frac, m.sink) == (0.5, 0.25, 4)
    m = adaptive("temporal,snapkv", online=True, adaptive_decay=0.3, ema_decay=0.5)
    assert m.candidates[0][1].online is True and m.decay == 0.3
    # Candidate arguments reach the registry's factories.
    m = adaptive("ema,expected_attention", ema_decay=0.5, ea_future=7, ea_cov=False)
    assert m.candidates[0][1].decay == 0.5
    assert (m.candidates[1][1].n_future, m.candidates[1][1].use_cov) == (7, False)
    KVShrinkConfig(method="adaptive").check_servable()


@pytest.mark.parametrize("value", ["snapkv,semantic", "adaptive", "none", "minicache",
                                   "snapkv+semantic", "", "snapkv,,ema", "snapkv,snapkv",
                                   "nope", "snapkv, streaming ,adaptive"])
def test_bad_scorers_name_the_key_value_and_allowed(value):
    with pytest.raises(KVShrinkConfigError) as e:
        KVShrinkConfig(method="adaptive", method_args={"adaptive_scorers": value})
    msg = str(e.value)
    assert "adaptive_scorers" in msg and repr(value) in msg
    assert "allowed: distinct, comma-separated names of streaming, h2o, snapkv" in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("key,value", [("adaptive_decay", 0.0), ("adaptive_decay", 1.0),
                                       ("adaptive_frac", 1.5), ("adaptive_sink", -1),
                                       ("adaptive_scorers", 3)])
def test_bad_numbers_are_refused(key, value):
    with pytest.raises(KVShrinkConfigError, match=rf"\[{key!r}\]={value!r}.*allowed"):
        KVShrinkConfig(method="adaptive", method_args={key: value})


def test_direct_construction_checks():
    with pytest.raises(ValueError, match="at least one"):
        AdaptiveSelect([])
    with pytest.raises(ValueError, match="repeat"):
        AdaptiveSelect([("a", KeyNorm()), ("a", SnapKV())])
    with pytest.raises(ValueError, match="adaptive_decay"):
        AdaptiveSelect([("a", KeyNorm())], decay=1.0)


# --------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def real_text(tokenizer):
    from vllm_kvshrink.lab.assets import load_essays

    ids = tokenizer(load_essays()[5], add_special_tokens=False)["input_ids"]
    return ids[:560], ids[560:608]


def _run(model, prompt, target, pre, **cfg):
    torch.manual_seed(0)
    c = KVShrinkConfig(budget=0.25, slack_tokens=16, recent_tokens=32, obs_window=16,
                       **cfg)
    from vllm_kvshrink.lab.hf.research import ResearchRunner

    r = ResearchRunner(model, c, block_size=16)
    res = r.run(prompt, forced=target, keep_logits=True, forced_chunk=16, prefill=pre)
    return res, r.method


def test_real_model_research_path(hf_model, real_text):
    from vllm_kvshrink.lab.hf.research import ResearchRunner

    prompt, target = real_text
    pre = ResearchRunner(hf_model, KVShrinkConfig(method="none")).prefill(prompt)
    a, ma = _run(hf_model, prompt, target, pre, method="adaptive")
    b, mb = _run(hf_model, prompt, target, pre, method="adaptive")
    assert len(a.events) >= 2
    assert [e["kept"] for e in a.events] == [e["kept"] for e in b.events]
    assert ma.summary() == mb.summary()
    s = ma.summary()
    assert s["events"] == len(a.events) == s["measured_events"]
    assert sum(s["choices"].values()) == len(a.events) * hf_model.config.num_hidden_layers
    assert torch.isfinite(a.logits).all()
    # One candidate alone: exactly that method.
    c, _ = _run(hf_model, prompt, target, pre, method="adaptive",
                method_args={"adaptive_scorers": "snapkv"})
    d, _ = _run(hf_model, prompt, target, pre, method="snapkv")
    assert [e["kept"] for e in c.events] == [e["kept"] for e in d.events]
    # The tier policy's scorer.
    store = "bf16,int4_tok_rot,int2_tok_rot"
    t1, mt = _run(hf_model, prompt, target, pre, method="adaptive", storage=store)
    t2, _ = _run(hf_model, prompt, target, pre, method="adaptive", storage=store)
    assert t1.events and [e["kept"] for e in t1.events] == [e["kept"] for e in t2.events]
    assert [e["level"] for e in t1.events] == [e["level"] for e in t2.events]
    assert all(e["bytes"] <= e["budget_bytes"] for e in t1.events)
    assert mt.summary()["events"] == len(t1.events)
    assert torch.isfinite(t1.logits).all()
    print("\nadaptive choices per layer (eviction, last event):", s["last_choice"],
          "\nsummary:", s, "\ntiers summary:", mt.summary())
