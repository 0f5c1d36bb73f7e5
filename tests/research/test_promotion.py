"""Promotion from an offload copy (research path), on the real model and
real text: a promoted token gets its original bits back (checked against a
separate full-cache prefill of the prompt), the resident bytes never exceed
the budget, the copy never exceeds its bound, its bytes and traffic are
counted apart, and without a copy nothing ever comes back."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError
from vllm_kvshrink.lab.hf.research import ResearchRunner
from vllm_kvshrink.storage.policy import EVICTED, plan_tiers

FORMS = "bf16,int4_tok_rot,int2_tok_rot"


@pytest.fixture(scope="module")
def text(tokenizer):
    from vllm_kvshrink.lab.assets import load_essays

    ids = tokenizer(load_essays()[9], add_special_tokens=False)["input_ids"]
    return ids[:320], ids[320:416]


def _run(model, prompt, target, offload, method="snapkv", events=None):
    args = {"online": False} if method == "temporal" else {}
    if offload:
        args["offload"] = offload
    cfg = KVShrinkConfig(method=method, budget=0.25, slack_tokens=16, recent_tokens=32,
                         storage=FORMS, method_args=args)
    runner = ResearchRunner(model, cfg, block_size=16)
    pre = runner.prefill(prompt)

    def snap(ev, cache):
        off = cache.offload
        events.append({
            "ev": ev, "kv_bytes": cache.kv_bytes(),
            "logical": cache.logical.clone(), "level": cache.level.clone(),
            "keys": torch.stack(cache.keys).clone(), "values": torch.stack(cache.values).clone(),
            "held": None if off is None else off.held.clone(),
            "off_bytes": None if off is None else off.nbytes()})

    res = runner.run(prompt, forced=target, keep_logits=True, forced_chunk=16,
                     prefill=pre, on_event=None if events is None else snap)
    return res, pre


def test_promoted_tokens_get_their_original_bits(hf_model, text):
    prompt, target = text
    events: list = []
    res, pre = _run(hf_model, prompt, target, 1.0, events=events)
    assert len(events) >= 3
    # The originals of the prompt's tokens: the full-cache prefill, computed
    # before any compression (independent of the offload store).
    ref_k = torch.stack(pre.cache.keys)  # [L, H, P, D]
    ref_v = torch.stack(pre.cache.values)
    promoted_bf16 = 0
    prev = None
    for e in events:
        pos, lev = e["logical"].long(), e["level"]
        prompt_bf16 = (lev == 0) & (pos < len(prompt))
        d = ref_k.shape[-1]
        idx = pos.clamp_max(len(prompt) - 1)[..., None].expand(-1, -1, -1, d)
        want_k, want_v = ref_k.gather(2, idx), ref_v.gather(2, idx)
        # Every prompt token held in bf16 holds exactly its original K/V.
        assert torch.equal(e["keys"][prompt_bf16], want_k[prompt_bf16])
        assert torch.equal(e["values"][prompt_bf16], want_v[prompt_bf16])
        if prev is not None:
            # Tokens now in bf16 that were quantized or evicted before.
            l, h, _ = prev["level"].shape
            before = torch.full((l, h, e["ev"]["logical_len"]), EVICTED, dtype=torch.int8)
            before.scatter_(2, prev["logical"].long(), prev["level"])
            was = before.gather(2, pos)
            promoted_bf16 += int(((was != 0) & prompt_bf16).sum())
        prev = e
    assert promoted_bf16 > 0, "no token came back: the test would prove nothing"
    st = res.stats["offload"]
    assert st["promoted_tokens"] > 0 and st["promoted_bytes"] == st["promoted_tokens"] * 4 * 64


def test_resident_bytes_fit_and_the_copy_is_bounded(hf_model, text):
    prompt, target = text
    for offload in (1.0, 0.25):
        events: list = []
        res, _ = _run(hf_model, prompt, target, offload, events=events)
        for e in events:
            assert e["kv_bytes"] <= e["ev"]["budget_bytes"]
            cap = int(offload * e["ev"]["logical_len"])
            per_row = e["held"].sum(-1)
            assert int(per_row.max()) <= cap
            d = e["keys"].shape[-1]
            assert e["off_bytes"] == int(e["held"].sum()) * 4 * d
            # The copy holds no token that is resident in bf16.
            l, h, n = e["held"].shape
            bf16 = torch.zeros(l, h, n, dtype=torch.bool)
            bf16.scatter_(2, e["logical"].long(), e["level"] == 0)
            assert not bool((e["held"] & bf16).any())
        assert res.offload_bytes and max(res.offload_bytes) > 0
        assert max(res.kv_bytes) < 0.35 * max(res.full_kv_bytes)  # resident: the budget


def test_without_a_copy_nothing_comes_back(hf_model, text):
    prompt, target = text
    events: list = []
    res, _ = _run(hf_model, prompt, target, 0.0, events=events)
    assert res.offload_bytes == [] and "offload" not in res.stats
    prev = None
    for e in events:
        if prev is not None:
            l, h, _ = prev["level"].shape
            before = torch.full((l, h, e["ev"]["logical_len"]), EVICTED, dtype=torch.int8)
            before.scatter_(2, prev["logical"].long(), prev["level"])
            was = before.gather(2, e["logical"].long())
            old = e["logical"] < prev["ev"]["logical_len"]
            assert not bool((old & (was == EVICTED)).any())  # no evicted token returns
            assert not bool((old & (e["level"] < was)).any())  # none goes back up
        prev = e


def test_a_stateful_scorer_promotes_too(hf_model, text):
    prompt, target = text
    res, _ = _run(hf_model, prompt, target, 1.0, method="temporal")
    assert res.stats["offload"]["events"] >= 3
    assert res.stats["predictor"]["scored_events"] >= 2  # labels over the whole view


def test_unavailable_tokens_are_never_kept():
    scores = torch.rand(2, 2, 40)
    available = torch.ones(2, 2, 40, dtype=torch.bool)
    available[:, :, 10:20] = False
    scores[:, :, 10:20] = 100.0  # the best scores, but gone
    plan = plan_tiers(scores, ("bf16", "int4_tok_rot"), 2 * 2 * 256 * 16, 64, 2, 4,
                      [0.0, 0.1], available=available)
    assert bool((plan.level[:, :, 10:20] == EVICTED).all())
    assert int((plan.level >= 0).sum()) > 2 * 2 * 6


def test_offload_settings_are_checked():
    with pytest.raises(KVShrinkConfigError, match=r"(?i)method_args.*offload.*tiered storage"):
        KVShrinkConfig(method="snapkv", budget=0.25, method_args={"offload": 0.5})
    with pytest.raises(KVShrinkConfigError, match=r"offload.*out of range"):
        KVShrinkConfig(method="snapkv", budget=0.25, storage=FORMS,
                       method_args={"offload": 1.5})
    cfg = KVShrinkConfig(method="snapkv", budget=0.25, storage=FORMS,
                         method_args={"offload": 0.5})
    with pytest.raises(KVShrinkConfigError, match=r"offload.*research path only"):
        cfg.check_servable()
