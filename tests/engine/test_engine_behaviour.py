"""The compressed engine keeps vLLM's guarantees: stock behaviour when off,
an intact prefix cache, per-request settings, and a clean fallback when
compaction fails.  Block accounting under preemption and aborts:
test_engine_reference.py."""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.bench.launch import run_engine

from engine_checks import stock_tokens

pytestmark = pytest.mark.engine


def _llm(model_path, **kw):
    base = dict(model=model_path, dtype="bfloat16", max_model_len=2048,
                kv_cache_memory_bytes=96 << 20, block_size=32, max_num_seqs=8,
                enforce_eager=True, seed=0)
    base.update(kw)
    return base


#: Tests that compare a compressing engine's uncompressed requests with stock
#: run in fp32: in bf16 vLLM's CPU kernel splits work by the whole batch's
#: sequence lengths (a neighbour's compacted cache changes the rounding) -- a
#: greedy flip would then be noise, not a leak.
FP32 = {"dtype": "float32"}


def _spec(model_path, prompts, max_tokens=32, **kw):
    return {
        "llm": _llm(model_path, **kw.pop("llm", {})),
        "prompts": [{"prompt_token_ids": p} for p in prompts],
        "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
        **kw,
    }


def _tokens(result):
    return {k: v["token_ids"] for k, v in result["outputs"].items()}


def test_off_is_stock(model_path, essay_prompts, stock):
    """Plugin absent and plugin with method none (the shared stock run):
    greedy tokens identical, nothing patched.  Requests opting out of an
    active method beside compressed ones equal stock too:
    test_prefix_cache_never_serves_compacted_blocks here, and
    test_prefix_cache_fallback_and_opt_out (tiers)."""
    absent = run_engine(_spec(model_path, essay_prompts[1:3], llm=FP32),
                        {"VLLM_PLUGINS": "no-such-plugin"})
    assert absent["scheduler_cls"] == "Scheduler"
    assert stock["scheduler_cls"] == "Scheduler"  # nothing patched with 'none'
    assert _tokens(absent) == {"0": stock_tokens(stock, 1, 32), "1": stock_tokens(stock, 2, 32)}


def test_bad_setting_stops_engine_start(model_path):
    """A refused setting stops vLLM's start-up with the plugin's message.
    Every other refusal is tested by calling its check
    (tests/unit/test_startup_refusals.py, test_config.py)."""
    with pytest.raises(RuntimeError) as err:
        run_engine(_spec(model_path, [[1, 2, 3]]), {"VLLM_KVSHRINK_METHOD": "h2oo"})
    msg = str(err.value)
    assert "VLLM_KVSHRINK_METHOD='h2oo'" in msg and "snapkv" in msg


def test_prefix_cache_never_serves_compacted_blocks(model_path, essay_prompts, stock):
    """Request 0 (uncompressed) caches prompt P; request 1 (compressed) hits that
    cache and is compacted while sharing the blocks (copy on write); request 2
    (uncompressed) arrives later and hits the cache again.  Requests 0 and 2
    must produce exactly what stock vLLM produces for P on the same workload.
    (This test caught a real bug: new tokens written into a shared tail block.)"""
    p = essay_prompts[0]
    prompts = [p, p, p, essay_prompts[1]]
    extra = {0: {"method": "none"}, 2: {"method": "none"}}
    result = run_engine(
        _spec(model_path, prompts, max_tokens=48, per_request_extra=extra, arrival=1, llm=FP32,
              check_invariants=True),
        {"VLLM_KVSHRINK_METHOD": "snapkv", "VLLM_KVSHRINK_BUDGET": "128",
         "VLLM_KVSHRINK_SLACK_TOKENS": "16", "VLLM_KVSHRINK_STRICT": "1"})
    want = stock_tokens(stock, 0, 48)
    assert result["outputs"]["0"]["token_ids"] == want
    assert result["outputs"]["2"]["token_ids"] == want
    assert result["outputs"]["1"]["token_ids"][:1] == want[:1]  # prefill unchanged
    k = result["kvshrink"]
    assert k["compactions"] >= 2 and k["cow_blocks"] > 0
    assert result["free_blocks_end"] == result["total_blocks"]


def _budget_and_fault(model_path, essay_prompts):
    """Spec and settings of :func:`test_per_request_budget_and_fallback`."""
    spec = _spec(model_path, essay_prompts[:3], llm=FP32, per_request_extra={1: {"budget": 400}})
    env = {"VLLM_KVSHRINK_METHOD": "snapkv", "VLLM_KVSHRINK_BUDGET": "64",
           "VLLM_KVSHRINK_INJECT_FAULT": "0-", "VLLM_KVSHRINK_RECORD_DIR": "",
           "VLLM_KVSHRINK_SLACK_TOKENS": "16"}
    return spec, env


@pytest.fixture(scope="module")
def budget_run(model_path, essay_prompts):
    return run_engine(*_budget_and_fault(model_path, essay_prompts))


def test_per_request_budget_and_fallback(budget_run, stock):
    """Request 0 fails inside compaction (injected): it is served uncompressed,
    identical to stock, and counted.  Request 1 asks for a bigger budget.
    fp32: see FP32."""
    result = budget_run
    assert result["outputs"]["0"]["token_ids"] == stock_tokens(stock, 0, 32)
    assert "packed_attention" not in result["kvshrink_seconds"]  # eviction packs nothing
    assert result["kvshrink"]["fallbacks"] == 1
    assert result["kvshrink"]["compactions"] >= 2
    assert result["free_blocks_end"] == result["total_blocks"]


def test_max_model_len_is_logical(model_path, essay_prompts):
    """Stop at max_model_len counts logical tokens, not the compacted cache:
    a 400-token prompt under max_model_len 448 gets 48 tokens, as in stock
    vLLM, although the cache never holds more than about 64."""
    p = essay_prompts[1][:400]
    spec = _spec(model_path, [p], max_tokens=600, llm={"max_model_len": 448})
    spec["sampling"]["ignore_eos"] = True
    ours = run_engine(spec, {"VLLM_KVSHRINK_METHOD": "streaming",
                             "VLLM_KVSHRINK_BUDGET": "64"})
    assert ours["kvshrink"]["compactions"] > 0
    assert len(ours["outputs"]["0"]["token_ids"]) == 448 - 400


def test_forked_run_equals_a_fresh_interpreter(model_path, essay_prompts, monkeypatch,
                                               budget_run, stock):
    """The suite forks engine runs from one process that imported torch and
    vLLM (bench/forkserver.py): a forked run must be the run a fresh
    interpreter makes -- same tokens, same plugin counters (an injected
    fallback included), plugin registered from the child's own settings."""
    from vllm_kvshrink.lab.bench import launch

    monkeypatch.setattr(launch, "FORK_SERVER", False)
    fresh = run_engine(*_budget_and_fault(model_path, essay_prompts))
    forked = budget_run
    assert forked["pid"] != fresh["pid"]
    assert forked["scheduler_cls"] == fresh["scheduler_cls"] == "KVShrinkScheduler"
    assert _tokens(forked) == _tokens(fresh)
    assert _tokens(fresh)["2"] != stock_tokens(stock, 2, 32)  # compressed to 64 tokens
    for key in ("compactions", "fallbacks"):
        assert forked["kvshrink"][key] == fresh["kvshrink"][key]
    assert fresh["kvshrink"]["compactions"] > 0
