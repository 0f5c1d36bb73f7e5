"""Checks the engine test modules share: greedy tokens equal stock's (the
session's shared stock run, ``conftest.stock``) or a transformers replay that
masks what the engine evicted (eviction) or reads every kept token through
its form (tiers)."""

from __future__ import annotations

from vllm_kvshrink.lab.hf.replay import compare_greedy, replay_logits
from vllm_kvshrink.lab.hf.replay_tiers import replay_tier_logits

#: Tokens generated per request in the shared stock run: a test that
#: generates fewer compares with this run's first tokens (greedy decoding).
STOCK_TOKENS = 48


def stock_tokens(stock: dict, i: int, n: int) -> list[int]:
    """The first ``n`` greedy tokens stock vLLM gives ``essay_prompts[i]``."""
    assert n <= STOCK_TOKENS, n
    return stock["outputs"][str(i)]["token_ids"][:n]


def check_evictions(result, events, hf_model, prompts, min_events=1, keys=None) -> int:
    """Every request's greedy tokens equal the masked replay of its events
    (fp32: a numerical tie within 1e-4 may flip).  ``keys``: the requests'
    ids in ``result`` (default ``"0"``, ``"1"``, ...).  Returns how many
    requests were compressed; at least ``min_events``."""
    keys = keys or [str(i) for i in range(len(prompts))]
    compressed = 0
    for key, p in zip(keys, prompts):
        out = result["outputs"][key]
        tokens = p + out["token_ids"]
        evs = events.get(key, [])
        compressed += bool(evs)
        logits = replay_logits(hf_model, tokens, evs, first=len(p) - 1)
        verdict = compare_greedy(logits, tokens, len(p))
        assert verdict["mismatch"] is None or verdict["tie"], (
            f"request {key}: engine token at {verdict['mismatch']} differs from the "
            f"masked replay ({len(evs)} events)")
    assert compressed >= min_events
    return compressed


#: Replays of tier events agree with the engine up to rounding-boundary code
#: flips: vLLM's and transformers' fp32 keys differ by ~1e-6, and a value on
#: a quantization boundary takes the next code (a whole int2 or int4 step).
#: Measured on these prompts (fp32, snapkv, bf16/int4/int2, budget 0.15):
#: engine vs replay log-probabilities differ by up to 0.04 (0.0017-0.04 per
#: request), eviction alone by under 6e-5; a greedy mismatch whose replay
#: top-2 gap is below this margin is such a flip.
TIER_TIE_MARGIN = 0.05


def check_tiers(result, events, hf_model, prompts, tie_margin=TIER_TIE_MARGIN,
                keys=None) -> None:
    """Every request's greedy tokens equal the dequantized replay of its tier
    events; packed forms were used, and they matter (a mask-only replay is
    measurably different from the dequantized one)."""
    keys = keys or [str(i) for i in range(len(prompts))]
    packed_seen = False
    quantization_matters = False
    for key, p in zip(keys, prompts):
        tokens = p + result["outputs"][key]["token_ids"]
        evs = events.get(key, [])
        assert len(evs) >= 2
        packed_seen |= any(sum(e["counts"][1:]) > 0 for e in evs)
        logits = replay_tier_logits(hf_model, tokens, evs, first=len(p) - 1)
        verdict = compare_greedy(logits, tokens, len(p), tie_margin=tie_margin)
        assert verdict["mismatch"] is None or verdict["tie"], (
            f"request {key}: engine token at {verdict['mismatch']} differs from the "
            f"dequantized replay ({len(evs)} events; logit gap {verdict['gap']:.2e})")
        if not quantization_matters:  # shown once is enough
            masked = replay_logits(hf_model, tokens, evs, first=len(p) - 1)
            # rows from the last prompt token to the last sampled one
            quantization_matters = float((masked[:-1] - logits[:-1]).abs().max()) > 1e-2
    assert packed_seen and quantization_matters


def check_mixed(result, events, hf_model, evict, tiered, evict_keys, tier_keys) -> int:
    """One engine run serving evicting and tiered requests side by side: the
    evicting ones equal the masked replay (:func:`check_evictions`, at least
    three compressed), the tiered ones the dequantized replay
    (:func:`check_tiers`), and each request was compressed the way it asked.
    Returns how many evicting requests were compressed."""
    n = check_evictions(result, events, hf_model, evict, min_events=3, keys=evict_keys)
    check_tiers(result, events, hf_model, tiered, keys=tier_keys)
    assert all("level" not in e for key in evict_keys for e in events.get(key, []))
    assert all("level" in e for key in tier_keys for e in events[key])
    return n
