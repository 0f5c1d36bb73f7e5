"""vLLM's default mode (torch.compile, as `vllm serve` and the README run it):
one compiled engine serves evicting and tiered requests side by side (each
request picks its storage), and every request's greedy tokens equal its
reference -- the masked replay for eviction, the dequantized replay for tiered
storage (vllm_kvshrink/lab/hf/replay.py, replay_tiers.py).  fp32, prompts
prefilled in chunks of 256 tokens, so events also fall between chunks.

Compiled mode is one engine start here: compiling the model is most of a
short compiled run.
"""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.bench.launch import run_engine
from vllm_kvshrink.policy.record import load_events

from engine_checks import check_mixed

pytestmark = pytest.mark.engine

MIX = "bf16,int4_tok_rot,int2_tok_rot"


@pytest.fixture(scope="module")
def tier_prompts(tokenizer):
    """Three essays the eviction requests do not use (no prefix-cache hits
    between the two kinds)."""
    from vllm_kvshrink.lab.assets import load_essays

    essays = load_essays()
    return [tokenizer(essays[12 + i], add_special_tokens=False)["input_ids"][:500 + 60 * i]
            for i in range(3)]


def test_compiled_engine_matches_both_replays(tmp_path, model_path, hf_model, essay_prompts,
                                              tier_prompts):
    evict, tiered_prompts = essay_prompts[1:4], tier_prompts[:2]
    prompts = evict + tiered_prompts
    tiered = {str(len(evict) + i): {"storage": MIX, "budget": 0.15}
              for i in range(len(tiered_prompts))}
    spec = {
        "llm": dict(model=model_path, dtype="float32", max_model_len=2048,
                    kv_cache_memory_bytes=256 << 20, block_size=32, max_num_seqs=8,
                    max_num_batched_tokens=256, enforce_eager=False, seed=0),
        "prompts": [{"prompt_token_ids": p} for p in prompts],
        "per_request_extra": tiered,
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
    assert k["fallbacks"] == 0 and k["compactions"] >= 3 and k["tier_events"] >= 3
    events = load_events(tmp_path)
    evict_keys = [str(i) for i in range(len(evict))]
    tier_keys = list(tiered)
    # Each request equals its replay and was compressed the way it asked.
    # Inductor's fused kernels reorder fp32 reductions (a 1.4e-3 logit gap
    # seen at a flip on an AVX-512 Xeon); eager runs allow 1e-4.
    check_mixed(result, events, hf_model, evict, tiered_prompts, evict_keys, tier_keys)
    # Some request was compressed before its prompt was fully prefilled.
    assert any(e["logical_len"] < len(prompts[int(r)]) for r, evs in events.items()
               for e in evs)
    assert result["free_blocks_end"] == result["total_blocks"]
