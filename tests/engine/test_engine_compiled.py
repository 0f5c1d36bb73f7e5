"""vLLM's default mode (torch.compile, as `vllm serve` and the README run it),
blocks of 128 tokens, prompts prefilled in chunks of 256 (events also fall
between chunks): one compiled engine serves evicting and tiered requests side
by side, each request picking its method, budget and storage, and every
request's greedy tokens equal its reference -- the masked replay for eviction,
the dequantized replay for tiered storage (vllm_kvshrink/lab/hf/replay.py,
replay_tiers.py).  fp32.  Eviction: snapkv at a token budget and at a
fraction, knorm (query-free, per-head scores), StreamingLLM; tiers: three
levels with eviction, a form with 4-bit keys and 2-bit values, and no bf16
beyond the sinks and recent tokens.

Compiling the model is most of this run (one whole-model graph through
inductor on CPU), so every check that needs these engine settings shares it.
Blocks of 32 tokens with chunked prefill, in eager mode:
test_engine_reference.py's test_prompt_longer_than_pool and
test_preemption_aborts_and_recomputation.
"""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.bench.launch import run_engine
from vllm_kvshrink.lab.hf.replay import compare_greedy, replay_logits
from vllm_kvshrink.policy.record import load_events

from engine_checks import check_mixed

pytestmark = pytest.mark.engine

MIX = "bf16,int4_tok_rot,int2_tok_rot"
#: request index -> its settings (the others: snapkv at 0.25)
EXTRA = {0: {"budget": 96}, 1: {"method": "knorm", "budget": 128},
         3: {"method": "streaming"},
         5: {"storage": MIX, "budget": 0.15}, 6: {"storage": "bf16,k4v2_tok", "budget": 0.25},
         7: {"storage": "int8_tok,int2_tok_rot", "budget": 0.12}}


def test_compiled_engine_matches_both_replays(tmp_path, model_path, hf_model, essay_prompts,
                                              tier_prompts):
    evict, tiered = essay_prompts[:5], tier_prompts
    prompts = evict + tiered
    evict_keys = [str(i) for i in range(len(evict))]
    tier_keys = [str(len(evict) + i) for i in range(len(tiered))]
    spec = {
        "llm": dict(model=model_path, dtype="float32", max_model_len=2048,
                    kv_cache_memory_bytes=256 << 20, block_size=128, max_num_seqs=8,
                    max_num_batched_tokens=256, enforce_eager=False, seed=0),
        "prompts": [{"prompt_token_ids": p} for p in prompts],
        "per_request_extra": EXTRA,
        "sampling": {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True},
        "check_invariants": True,
    }
    env = {
        "VLLM_KVSHRINK_METHOD": "snapkv",
        "VLLM_KVSHRINK_BUDGET": "0.25",
        "VLLM_KVSHRINK_SLACK_TOKENS": "16",
        "VLLM_KVSHRINK_RECENT_TOKENS": "32",
        "VLLM_KVSHRINK_OBS_WINDOW": "16",
        "VLLM_KVSHRINK_RECORD_DIR": str(tmp_path),
        "VLLM_KVSHRINK_STRICT": "1",
    }
    result = run_engine(spec, env)
    assert result["scheduler_cls"] == "KVShrinkScheduler"
    k = result["kvshrink"]
    assert k["fallbacks"] == 0 and k["tier_events"] >= 3
    events = load_events(tmp_path)
    # Each request equals its replay and was compressed the way it asked.
    n = check_mixed(result, events, hf_model, evict, tiered, evict_keys, tier_keys)
    assert k["compactions"] >= n
    assert set(result["peak_bytes_held"]) - {"bf16"}  # packed forms held, in bytes
    # Some request was compressed before its prompt was fully prefilled, and
    # decode-time events happened too.
    assert any(e["logical_len"] < len(prompts[int(r)]) for r, evs in events.items()
               for e in evs)
    assert any(e["logical_len"] > len(prompts[int(r)]) for r, evs in events.items()
               for e in evs)
    assert result["free_blocks_end"] == result["total_blocks"]

    # The eviction replay has teeth: without the evictions it disagrees
    # somewhere (one disagreeing request is enough).
    def disagrees(r):
        p = prompts[int(r)]
        tokens = p + result["outputs"][r]["token_ids"]
        full = compare_greedy(replay_logits(hf_model, tokens, [], first=len(p) - 1), tokens,
                              len(p))
        return full["mismatch"] is not None

    assert any(disagrees(r) for r in evict_keys if events.get(r))
