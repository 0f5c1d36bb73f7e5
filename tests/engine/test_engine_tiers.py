"""Tiered storage served by the engine: packed blocks in vLLM's pool.

* Engine vs research path (fp32): at every tier event the same tokens are
  kept, each in the same form, and the greedy tokens are identical (a
  numerical tie between vLLM's and transformers' keys may flip one entry in a
  thousand, as for eviction).
* vLLM's guarantees hold with packed blocks: prefix cache, fallback, opt-out,
  and a prompt longer than the pool served when its packed peak fits.

Engine vs an independent reference (a transformers forward pass whose
attention reads every kept token through its form's store-and-read-back:
vllm_kvshrink/lab/hf/replay_tiers.py), and ownership at every step and every
block back after preemption and aborts with packed blocks:
test_engine_reference.py (eager) and test_engine_compiled.py.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.lab.bench.agreement import compare
from vllm_kvshrink.lab.bench.launch import run_engine

from engine_checks import stock_tokens

pytestmark = pytest.mark.engine

MIX = "bf16,int4_tok_rot,int2_tok_rot"


def _spec(model_path, prompts, max_tokens=60, dtype="float32", block_size=32, **kw):
    llm = dict(model=model_path, dtype=dtype, max_model_len=2048,
               kv_cache_memory_bytes=256 << 20, block_size=block_size, max_num_seqs=8,
               enforce_eager=True, seed=0)
    llm.update(kw.pop("llm", {}))
    return {"llm": llm, "prompts": [{"prompt_token_ids": p} for p in prompts],
            "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
            **kw}


def _env(storage=MIX, budget="0.2", **extra):
    env = {"VLLM_KVSHRINK_METHOD": "snapkv", "VLLM_KVSHRINK_BUDGET": budget,
           "VLLM_KVSHRINK_STORAGE": storage, "VLLM_KVSHRINK_SLACK_TOKENS": "16",
           "VLLM_KVSHRINK_STRICT": "1"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from vllm_kvshrink.lab.assets import load_essays

    essays = load_essays()
    return [tokenizer(essays[3 + i], add_special_tokens=False)["input_ids"][:260 + 40 * i]
            for i in range(4)]


def test_engine_and_research_path_hold_the_same_forms(model_path, hf_model, prompts):
    methods = ["snapkv", "h2o", "tova", "expected_attention"]
    rows = compare(model_path, "float32", methods, prompts, max_tokens=60, budget=0.2,
                   storage=MIX, hf_model=hf_model)
    for r in rows:
        assert r["fallbacks"] == 0
        assert r["engine_events"] >= 2, r
        assert r["engine_events"] == r["research_events"] == r["matched_events"], r
        assert r["counts_equal"], r
        assert r["agreement_min"] >= 0.999, r
        assert r["level_min"] >= 0.999, r
        assert r["tokens_equal"] or r["level_min"] < 1.0, r


def test_prefix_cache_fallback_and_opt_out(model_path, essay_prompts, stock):
    """Request 1 shares request 0's cached prompt and is packed; request 2
    (uncompressed) hits the cache later and must equal stock; request 3 fails
    inside its tier event (injected) and continues on its bf16 blocks, equal
    to stock and counted.  fp32: in bf16 vLLM's CPU kernel splits work by the
    whole batch's sequence lengths, so a neighbour's cache size changes the
    rounding of a request's attention (a greedy flip is then noise, not a
    leak)."""
    p = essay_prompts[0]
    prompts = [p, p, p, essay_prompts[1]]
    extra = {0: {"method": "none"}, 2: {"method": "none"}}
    result = run_engine(
        _spec(model_path, prompts, max_tokens=48, arrival=1,
              per_request_extra=extra, check_invariants=True),
        _env(MIX, "0.25", VLLM_KVSHRINK_INJECT_FAULT="3-", VLLM_KVSHRINK_STRICT="0"))
    want = stock_tokens(stock, 0, 48)
    assert result["outputs"]["0"]["token_ids"] == want
    assert result["outputs"]["2"]["token_ids"] == want
    assert result["outputs"]["3"]["token_ids"] == stock_tokens(stock, 1, 48)
    k = result["kvshrink"]
    assert k["tier_events"] >= 2 and k["fallbacks"] == 1
    spent = result["kvshrink_seconds"]
    assert "scoring" not in spent and "move" not in spent  # no eviction ran
    assert result["free_blocks_end"] == result["total_blocks"]


def test_replay_has_teeth():
    """A wrong form in the record changes the replay's attention."""
    from vllm_kvshrink.lab.hf import replay_tiers

    torch.manual_seed(0)
    k = torch.randn(2, 12, 64)
    v = torch.randn(2, 12, 64)
    e = {"logical_len": 10, "kept": [[[0, 3, 5, 9]] * 2], "level": [[[0, 1, 2, 0]] * 2],
         "storage": ["bf16", "int8_tok", "int2_tok"]}
    form_of = torch.zeros(2, 12, dtype=torch.long)
    k1, v1, vis = replay_tiers._held_after(k, v, e, 0, form_of)
    assert torch.equal(k1[:, 0], k[:, 0]) and not torch.equal(k1[:, 5], k[:, 5])
    assert float((k1[:, 3] - k[:, 3]).abs().max()) < float((k1[:, 5] - k[:, 5]).abs().max())
    assert vis[:, [0, 3, 5, 9]].all() and int(vis.sum()) == 8
    assert form_of[:, [0, 3, 5, 9]].tolist() == [[0, 1, 2, 0]] * 2
    # A later event keeping token 3 in int8: its values stay as they are
    # (the engine leaves its bytes); token 9, entering int8, is stored anew.
    e2 = {"logical_len": 12, "kept": [[[0, 3, 9, 11]] * 2], "level": [[[0, 1, 1, 0]] * 2],
          "storage": ["bf16", "int8_tok", "int2_tok"]}
    k2, _, _ = replay_tiers._held_after(k1, v1, e2, 0, form_of)
    assert torch.equal(k2[:, 3], k1[:, 3]) and not torch.equal(k2[:, 9], k1[:, 9])


def test_front_end_counts_blocks_by_form(model_path, tokenizer):
    """A prompt longer than the pool is served with tiered storage when its
    peak in blocks (packed forms included) fits, and refused by name when it
    does not."""
    from vllm_kvshrink.lab.assets import load_essays

    ids = tokenizer("\n\n".join(load_essays()[20:23]), add_special_tokens=False)["input_ids"]
    ids = ids[:1500]
    spec = _spec(model_path, [ids], max_tokens=16, dtype="bfloat16", check_invariants=True,
                 llm={"kv_cache_memory_bytes": 640 * 23040, "max_num_batched_tokens": 256})
    result = run_engine(spec, _env(MIX, "0.1", VLLM_KVSHRINK_SLACK_TOKENS="32"))
    assert result["total_blocks"] * 32 < len(ids)  # the prompt alone overflows the pool
    assert len(result["outputs"]["0"]["token_ids"]) == 16
    assert result["kvshrink"]["tier_events"] >= 3 and result["kvshrink"]["fallbacks"] == 0
    assert result["free_blocks_end"] == result["total_blocks"]
    spec["per_request_extra"] = {0: {"budget": 1.0}}
    with pytest.raises(RuntimeError, match="KV blocks even with tiered storage"):
        run_engine(spec, _env(MIX, "0.1"))
