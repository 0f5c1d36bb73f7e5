"""Engine path and transformers research path keep the same tokens.

For every method the engine serves, one engine run (each request picks its
method through extra_args) records every compaction; the research path
(vllm_kvshrink/lab/hf/research.py) runs the same prompt and config through
transformers and calls the same method object.  fp32 on both sides: kept
(layer, KV head, position) sets must agree up to numerical ties between
vLLM's and transformers' keys, and the greedy tokens must be identical.
Learned methods run frozen (online training would make each path's weights
depend on its own history).  bf16 agreement is reported by
benchmarks/bench_agreement.py.
"""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.bench.agreement import compare
from vllm_kvshrink.lab.bench.launch import run_engine
from vllm_kvshrink.lab.hf.research import kept_agreement

pytestmark = pytest.mark.engine

SERVED = ["streaming", "h2o", "snapkv", "tova", "knorm", "ema", "temporal", "expected_attention", "semantic",
          "temporal+semantic"]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from vllm_kvshrink.lab.assets import load_essays

    essays = load_essays()
    return [tokenizer(essays[3 + i], add_special_tokens=False)["input_ids"][:300]
            for i in range(len(SERVED))]


def test_engine_and_research_path_keep_the_same_tokens(model_path, hf_model, prompts):
    rows = compare(model_path, "float32", SERVED, prompts, hf_model=hf_model)
    for r in rows:
        assert r["fallbacks"] == 0
        assert r["engine_events"] >= 2, r
        assert r["engine_events"] == r["research_events"] == r["matched_events"], r
        # One entry in a thousand may flip where two scores tie to fp32 noise.
        assert r["agreement_min"] >= 0.999, r
        assert r["tokens_equal"] or r["agreement_min"] < 1.0, r


def test_agreement_metric_has_teeth():
    a = [[[0, 1, 2, 5]], [[0, 1, 3, 5]]]
    assert kept_agreement(a, a) == 1.0
    assert kept_agreement(a, [[[0, 1, 2, 4]], [[0, 2, 3, 4]]]) == pytest.approx(5 / 8)
    # different kept counts (tiered events): overlap over the larger count
    assert kept_agreement(a, [[[0, 1, 2]], [[0, 1, 3]]]) == pytest.approx(6 / 8)
    assert kept_agreement(a, [[[0, 1, 2, 5]]]) == 0.0  # other layers: no match


def test_online_learning_in_the_engine_is_counted(model_path, prompts):
    """Online training and merging really happen while serving, and their
    figures reach the scheduler's counters (and so /metrics)."""
    spec = {
        "llm": dict(model=model_path, dtype="float32", max_model_len=2048,
                    kv_cache_memory_bytes=128 << 20, block_size=32, max_num_seqs=4,
                    enforce_eager=True, seed=0),
        "prompts": [{"prompt_token_ids": p} for p in prompts[:3]],
        "sampling": {"max_tokens": 64, "temperature": 0.0, "ignore_eos": True},
        "check_invariants": True,
    }
    env = {"VLLM_KVSHRINK_METHOD": "temporal+semantic", "VLLM_KVSHRINK_BUDGET": "96",
           "VLLM_KVSHRINK_SLACK_TOKENS": "16", "VLLM_KVSHRINK_STRICT": "1"}
    r = run_engine(spec, env)
    k = r["kvshrink"]
    assert k["fallbacks"] == 0 and k["compactions"] >= 6
    assert k["predictor_updates"] >= 3
    assert 0.0 <= k["predictor_recall"] <= 1.0
    assert -1.0 <= k["predictor_spearman"] <= 1.0
    assert k["tokens_merged"] > 0
    assert r["free_blocks_end"] == r["total_blocks"]
