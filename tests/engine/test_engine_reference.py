"""Greedy tokens from the engine with eviction equal a transformers replay.

The replay masks exactly the positions the engine evicted, per layer and KV
head, at the moment it evicted them, and keeps logical position ids (see
vllm_kvshrink/lab/hf/replay.py).  fp32 on both sides, so the only slack allowed is
a numerical tie (top-2 logits within 1e-4), after which sequences may diverge.
"""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.bench.launch import run_engine
from vllm_kvshrink.lab.hf.replay import compare_greedy, replay_logits
from vllm_kvshrink.policy.record import load_events

from engine_checks import check_evictions

pytestmark = pytest.mark.engine

MAX_TOKENS = 40


def _spec(model_path, prompts, block_size, max_batched=None):
    llm = dict(model=model_path, dtype="float32", max_model_len=2048,
               kv_cache_memory_bytes=256 << 20, block_size=block_size,
               max_num_seqs=8, enforce_eager=True, seed=0)
    if max_batched:
        llm["max_num_batched_tokens"] = max_batched
    return {
        "llm": llm,
        "prompts": [{"prompt_token_ids": p} for p in prompts],
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True},
        "check_invariants": True,
    }


@pytest.mark.parametrize(
    "method,block_size,budget,max_batched",
    [
        ("snapkv", 32, "96", None),       # token-level, small blocks
        ("streaming", 128, "0.25", None),  # big blocks, fractional budget
        ("snapkv", 32, "0.25", 256),       # compaction between prefill chunks
        ("knorm", 32, "128", None),        # query-free, per-head scores
        # vLLM's default mode (torch.compile): test_engine_compiled.py
    ],
)
def test_engine_matches_masked_replay(tmp_path, model_path, hf_model, essay_prompts,
                                      method, block_size, budget, max_batched):
    prompts = essay_prompts[:5]
    env = {
        "VLLM_KVSHRINK_METHOD": method,
        "VLLM_KVSHRINK_BUDGET": budget,
        "VLLM_KVSHRINK_SLACK_TOKENS": "16",
        "VLLM_KVSHRINK_RECENT_TOKENS": "32",
        "VLLM_KVSHRINK_OBS_WINDOW": "16",
        "VLLM_KVSHRINK_RECORD_DIR": str(tmp_path),
        "VLLM_KVSHRINK_STRICT": "1",
    }
    spec = _spec(model_path, prompts, block_size, max_batched)
    result = run_engine(spec, env)
    assert result["scheduler_cls"] == "KVShrinkScheduler"
    events = load_events(tmp_path)
    n = check_evictions(result, events, hf_model, prompts, min_events=3)
    # The short prompt (61 tokens) stays under budget + slack for a while.
    assert result["kvshrink"]["compactions"] >= n
    assert result["kvshrink"]["fallbacks"] == 0
    assert result["free_blocks_end"] == result["total_blocks"]
    # Decode-time compaction happened too, not only after prefill.
    assert any(e["logical_len"] > len(prompts[int(r)]) for r, evs in events.items()
               for e in evs)
    if max_batched:
        # Some request was compacted before its prompt was fully prefilled.
        assert any(e["logical_len"] < len(prompts[int(r)]) for r, evs in events.items()
                   for e in evs)
    # The replay has teeth: without the evictions it disagrees somewhere
    # (one disagreeing request is enough; the rest are not replayed).
    def disagrees(r):
        tokens = prompts[int(r)] + result["outputs"][r]["token_ids"]
        full = compare_greedy(replay_logits(hf_model, tokens, []), tokens,
                              len(prompts[int(r)]))
        return full["mismatch"] is not None

    assert any(disagrees(r) for r in events)


def test_multiprocess_engine_matches_replay(tmp_path, model_path, hf_model, essay_prompts):
    """Default multiprocess engine: the plugin loads in every process."""
    import os

    prompts = essay_prompts[:3]
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_KVSHRINK_METHOD": "snapkv",
        "VLLM_KVSHRINK_BUDGET": "128",
        "VLLM_KVSHRINK_SLACK_TOKENS": "16",
        "VLLM_KVSHRINK_RECORD_DIR": str(tmp_path),
        "VLLM_KVSHRINK_STRICT": "1",
    }
    spec = _spec(model_path, prompts, 32)
    spec["check_invariants"] = False  # the scheduler lives in another process
    result = run_engine(spec, env)
    files = list(tmp_path.glob("events-*.jsonl"))
    assert files, "no compaction recorded"
    pids = {int(f.stem.split("-")[1]) for f in files}
    # Front-end process: registered and patched; the worker process (another
    # pid) compacted, following plans made by the scheduler in the engine core.
    assert result["plugin_active_here"]
    assert result["pid"] not in pids
    assert os.getpid() not in pids
    check_evictions(result, load_events(tmp_path), hf_model, prompts, min_events=3)


def test_worker_in_its_own_process_matches_replay(tmp_path, model_path, hf_model,
                                                  essay_prompts):
    """vLLM's multiprocess executor: the scheduler (here, in the front-end
    process, where its bookkeeping is checked at every step) and the worker
    are different processes, so every plan and every result crosses a process
    boundary through vLLM's own message queue."""
    prompts = essay_prompts[:3]
    env = {
        "VLLM_KVSHRINK_METHOD": "snapkv",
        "VLLM_KVSHRINK_BUDGET": "128",
        "VLLM_KVSHRINK_SLACK_TOKENS": "16",
        "VLLM_KVSHRINK_RECORD_DIR": str(tmp_path),
        "VLLM_KVSHRINK_STRICT": "1",
    }
    spec = _spec(model_path, prompts, 32)
    spec["llm"]["distributed_executor_backend"] = "mp"
    result = run_engine(spec, env)
    pids = {int(f.stem.split("-")[1]) for f in tmp_path.glob("events-*.jsonl")}
    assert pids and result["pid"] not in pids  # compacted in the worker process
    n = check_evictions(result, load_events(tmp_path), hf_model, prompts,
                              min_events=3)
    # The results came back: the scheduler counted every compaction and freed
    # the blocks it planned to free.
    assert result["kvshrink"]["compactions"] >= n
    assert result["kvshrink"]["fallbacks"] == 0 and result["kvshrink"]["blocks_freed"] > 0
    assert result["free_blocks_end"] == result["total_blocks"]


def test_prompt_longer_than_pool(tmp_path, model_path, hf_model, tokenizer):
    """A 1500-token prompt on a pool of 640 tokens: stock vLLM refuses to start;
    with compression between prefill chunks it is served, and its greedy tokens
    still equal the masked replay.  A request that opts out is refused with a
    clear error instead of waiting forever."""
    from vllm_kvshrink.lab.assets import load_essays

    ids = tokenizer("\n\n".join(load_essays()[20:23]), add_special_tokens=False)["input_ids"]
    ids = ids[:1500]
    assert len(ids) == 1500
    spec = _spec(model_path, [ids], 32, max_batched=256)
    spec["llm"].update(kv_cache_memory_bytes=640 * 46080, max_model_len=2048)
    spec["check_invariants"] = True
    with pytest.raises(RuntimeError, match="KV cache is needed"):
        run_engine(spec, {"VLLM_KVSHRINK_METHOD": "none"})
    env = {
        "VLLM_KVSHRINK_METHOD": "snapkv",
        "VLLM_KVSHRINK_BUDGET": "128",
        "VLLM_KVSHRINK_SLACK_TOKENS": "32",
        "VLLM_KVSHRINK_RECORD_DIR": str(tmp_path),
        "VLLM_KVSHRINK_STRICT": "1",
    }
    result = run_engine(spec, env)
    assert len(result["outputs"]["0"]["token_ids"]) == MAX_TOKENS
    events = load_events(tmp_path)["0"]
    assert sum(e["logical_len"] < len(ids) for e in events) >= 4  # between chunks
    assert result["free_blocks_end"] == result["total_blocks"]
    assert result["total_blocks"] * 32 < len(ids)
    check_evictions(result, {"0": events}, hf_model, [ids])
    spec["per_request_extra"] = {0: {"method": "none"}}
    with pytest.raises(RuntimeError, match="does not fit the KV pool"):
        run_engine(spec, env)


def test_preempted_requests_match_the_replay_of_each_recomputation(
        tmp_path, model_path, hf_model, essay_prompts):
    """A tight pool preempts compressed requests; each is recomputed from
    scratch and compressed again.  Every token it sampled is checked against
    a replay of the epoch it was sampled in (the events of that recomputation
    only), so the recomputed requests are compared with a reference too."""
    from vllm_kvshrink.policy.record import load_epochs

    prompts = [p[:400] for p in (essay_prompts * 2)[:8]]
    spec = _spec(model_path, prompts, 32)
    spec["sampling"]["max_tokens"] = 120
    spec["llm"].update(kv_cache_memory_bytes=1200 * 46080, max_model_len=1024)
    env = {
        "VLLM_KVSHRINK_METHOD": "snapkv",
        "VLLM_KVSHRINK_BUDGET": "0.8",
        "VLLM_KVSHRINK_SLACK_TOKENS": "32",
        "VLLM_KVSHRINK_RECORD_DIR": str(tmp_path),
        "VLLM_KVSHRINK_STRICT": "1",
    }
    result = run_engine(spec, env)
    assert result["preemptions"] > 0, "pool not tight enough to preempt"
    assert result["free_blocks_end"] == result["total_blocks"]
    epochs = load_epochs(tmp_path)
    restarted = [r for r, eps in epochs.items() if len(eps) > 1]
    assert restarted, "no compressed request was preempted"
    checked_after_restart = 0
    for r, eps in epochs.items():
        p = prompts[int(r)]
        tokens = p + result["outputs"][r]["token_ids"]
        starts = [len(p)] + [ep["start"] for ep in eps[1:]]
        assert all(s is not None and len(p) <= s <= len(tokens) for s in starts), starts
        for e, ep in enumerate(eps):
            end = starts[e + 1] if e + 1 < len(eps) else len(tokens)
            logits = replay_logits(hf_model, tokens[:end], ep["events"])
            verdict = compare_greedy(logits, tokens[:end], starts[e])
            assert verdict["mismatch"] is None or verdict["tie"], (
                f"request {r}, epoch {e} (tokens {starts[e]}..{end}): engine token "
                f"at {verdict['mismatch']} differs from the replay")
            if e > 0:
                checked_after_restart += verdict["checked"]
                assert ep["events"], f"request {r} was not compressed again after restart"
    assert checked_after_restart > 0
    # The epochs matter: replaying every event at once, as if the request had
    # never been recomputed, gives other logits for the tokens sampled after a
    # restart -- so the check above could fail.
    gap = 0.0
    for r in restarted:
        p = prompts[int(r)]
        tokens = p + result["outputs"][r]["token_ids"]
        start = epochs[r][1]["start"]
        merged = [ev for ep in epochs[r] for ev in ep["events"]]
        stale = replay_logits(hf_model, tokens, merged)[start - 1:]
        right = replay_logits(hf_model, tokens, epochs[r][1]["events"])[start - 1:]
        gap = max(gap, float((stale - right).abs().max()))
    assert gap > 1e-2, gap
