"""Tiered storage in the research path, on the real model and real text.

Independent checks: the K/V the path attends over after an event are the
forms' round trips of the tokens the full cache held (computed here from a
separate full-cache prefill), the bytes held fit the byte budget, a shared
prefill continues exactly like a one-chunk run, and budget 1.0 with bf16
only is the full cache to the last bit.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.lab.hf.research import ResearchRunner
from vllm_kvshrink.storage import get_form


@pytest.fixture(scope="module")
def text(tokenizer):
    from vllm_kvshrink.lab.assets import load_essays

    ids = tokenizer(load_essays()[7], add_special_tokens=False)["input_ids"]
    return ids[:300], ids[300:332]


def _run(model, prompt, target, prefill=None, chunk=None, **cfg):
    c = KVShrinkConfig(slack_tokens=16, recent_tokens=32, **cfg)
    r = ResearchRunner(model, c, block_size=16, chunk=chunk)
    return r.run(prompt, forced=target, keep_logits=True, forced_chunk=16, prefill=prefill)


def test_budget_one_with_bf16_only_is_the_full_cache(hf_model, text):
    prompt, target = text
    full = _run(hf_model, prompt, target, method="none")
    same = _run(hf_model, prompt, target, method="snapkv", budget=1.0, storage="bf16")
    assert same.events == []
    assert torch.equal(full.logits, same.logits)


def test_shared_prefill_equals_one_chunk(hf_model, text):
    prompt, target = text
    runner = ResearchRunner(hf_model, KVShrinkConfig(method="none"), block_size=16)
    pre = runner.prefill(prompt)
    for cfg in ({"method": "snapkv", "budget": 0.5},
                {"method": "tova", "budget": 0.25, "storage": "int4_tok_rot"}):
        a = _run(hf_model, prompt, target, **cfg)
        b = _run(hf_model, prompt, target, prefill=pre, **cfg)
        assert a.events and [e["kept"] for e in a.events] == [e["kept"] for e in b.events]
        torch.testing.assert_close(a.logits[-len(target):], b.logits[-len(target):],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("storage,budget", [("int4_tok_rot", 0.25), ("bf16,int4", 0.3),
                                            ("bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot",
                                             0.125)])
def test_tiered_event_holds_round_trips_within_budget(hf_model, text, storage, budget):
    prompt, target = text
    runner = ResearchRunner(hf_model, KVShrinkConfig(method="none"), block_size=16)
    pre = runner.prefill(prompt)  # the full cache's K/V, independently
    cfg = KVShrinkConfig(method="snapkv", budget=budget, storage=storage, slack_tokens=16,
                         recent_tokens=32)
    r = ResearchRunner(hf_model, cfg, block_size=16)
    seen = {}

    def on_event(ev, cache):
        if not seen:
            seen["ev"] = ev
            seen["keys"] = [k.clone() for k in cache.keys]
            seen["values"] = [v.clone() for v in cache.values]

    res = r.run(prompt, forced=target, keep_logits=True, forced_chunk=16, prefill=pre,
                on_event=on_event)
    ev = seen["ev"]
    hkv, d = pre.cache.keys[0].shape[0], pre.cache.keys[0].shape[2]
    token_bytes = len(pre.cache.keys) * hkv * 4 * d
    assert ev["bytes"] <= ev["budget_bytes"] == int(budget * len(prompt) * token_bytes)
    assert res.kv_bytes[0] == ev["bytes"]  # what the cache holds is what was planned
    level = torch.tensor(ev["level"])
    kept = torch.tensor(ev["kept"])  # logical positions = indices of the prefill
    levels = ev["storage"]
    assert bool((level[:, :, :4] == 0).all()) and bool((level[:, :, -32:] == 0).all())
    for layer in (0, 13, len(pre.cache.keys) - 1):
        for h in range(hkv):
            src_k = pre.cache.keys[layer][h, kept[layer, h]]
            src_v = pre.cache.values[layer][h, kept[layer, h]]
            for i, name in enumerate(levels):
                sel = level[layer, h] == i
                if not bool(sel.any()):
                    continue
                ek, ev_ = get_form(name).roundtrip(src_k[sel][None], src_v[sel][None])
                torch.testing.assert_close(seen["keys"][layer][h, sel], ek[0])
                torch.testing.assert_close(seen["values"][layer][h, sel], ev_[0])


def test_vllm_format_applied_after_prefill(hf_model, text):
    prompt, target = text
    runner = ResearchRunner(hf_model, KVShrinkConfig(method="none"), block_size=16)
    pre = runner.prefill(prompt)
    r = ResearchRunner(hf_model, KVShrinkConfig(method="none"), block_size=16,
                       store_form="int4_per_token_head", store_from="prefill_end")
    res = r.run(prompt, forced=target, keep_logits=True, forced_chunk=16, prefill=pre)
    f = get_form("int4_per_token_head")
    ek, ev_ = f.roundtrip(pre.cache.keys[5], pre.cache.values[5])
    torch.testing.assert_close(res.cache.keys[5][:, :len(prompt)], ek)
    torch.testing.assert_close(res.cache.values[5][:, :len(prompt)], ev_)
    hkv, d = pre.cache.keys[0].shape[0], pre.cache.keys[0].shape[2]
    assert res.kv_bytes[-1] == len(pre.cache.keys) * hkv * f.nbytes(len(prompt) + len(target), d)


def test_prefill_survives_every_row(hf_model, text):
    """A shared prefill is the same after any row ran from it (MiniCache
    writes into the K/V it is given)."""
    prompt, target = text
    runner = ResearchRunner(hf_model, KVShrinkConfig(method="none"), block_size=16)
    pre = runner.prefill(prompt)
    before = [k.clone() for k in pre.cache.keys]
    for cfg in ({"method": "minicache", "budget": 0.5},
                {"method": "snapkv", "budget": 0.25, "storage": "int4_tok_rot"}):
        _run(hf_model, prompt, target, prefill=pre, **cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, pre.cache.keys))
