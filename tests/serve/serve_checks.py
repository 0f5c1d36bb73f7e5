"""What one `vllm serve` with the plugin on must show through the OpenAI API
(run on the soak's server, tests/serve/test_soak.py, so that the suite starts
one server for both): requests are compressed (eviction, the learned methods,
tiered storage picked per request), a request opts out, every counter and
phase appears on /metrics, a bad per-request setting is answered 400 naming
it, and the engine's log line carries the counters."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from vllm_kvshrink.lab.bench.server import metric

SECONDS = "vllm:kvshrink_seconds_total"

#: what the server's environment must add for :func:`check_api_and_metrics`
ENV = {"VLLM_LOG_STATS_INTERVAL": "1"}


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def check_api_and_metrics(server, model_path: str, tokenizer, essay_prompts) -> None:
    """The module's checks on a running server started with :data:`ENV` added
    and a method on (the requests set their own storage and budget where it
    matters)."""
    base = server.url
    prompt = tokenizer.decode(essay_prompts[0])
    out = _post(base + "/v1/completions", {
        "model": model_path, "prompt": prompt, "max_tokens": 40, "temperature": 0,
        "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 40
    # Per-request opt-out through the OpenAI API's extra body.
    out2 = _post(base + "/v1/completions", {
        "model": model_path, "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "vllm_xargs": {"kvshrink_method": "none"}})
    assert out2["usage"]["completion_tokens"] >= 1
    # Another request picks our learned methods: online training and
    # merging happen in the server's worker process and are exported.
    out3 = _post(base + "/v1/completions", {
        "model": model_path, "prompt": tokenizer.decode(essay_prompts[1]),
        "max_tokens": 48, "temperature": 0, "ignore_eos": True,
        "vllm_xargs": {"kvshrink_method": "temporal+semantic"}})
    assert out3["usage"]["completion_tokens"] == 48
    # And one asks for tiered storage: packed blocks in the worker process.
    out4 = _post(base + "/v1/completions", {
        "model": model_path, "prompt": tokenizer.decode(essay_prompts[3]),
        "max_tokens": 48, "temperature": 0, "ignore_eos": True,
        "vllm_xargs": {"kvshrink_storage": "bf16,int4_tok_rot,int2_tok_rot",
                       "kvshrink_budget": 0.25}})
    assert out4["usage"]["completion_tokens"] == 48
    deadline = time.time() + 30
    while True:
        metrics = server.metrics()
        if (metric(metrics, "vllm:kvshrink_tokens_merged_total") > 0
                and metric(metrics, "vllm:kvshrink_predictor_updates_total") > 0
                and metric(metrics, "vllm:kvshrink_tier_events_total") > 0
                and 'form="int4_tok_rot"' in metrics
                and metric(metrics, SECONDS, phase="packed_attention") > 0
                ) or time.time() > deadline:
            break
        time.sleep(1)
    assert metric(metrics, "vllm:kvshrink_tier_events_total") >= 1
    assert metric(metrics, "vllm:kvshrink_tokens_demoted_total") > 0
    assert 'vllm:kvshrink_bytes_held{engine="0",form="int4_tok_rot"}' in metrics
    assert metric(metrics, "vllm:kvshrink_tokens_merged_total") > 0
    assert metric(metrics, "vllm:kvshrink_predictor_updates_total") > 0
    assert 0 <= metric(metrics, "vllm:kvshrink_predictor_recall") <= 1
    # The shipped weights were trained on this very model: nothing foreign.
    assert "vllm:kvshrink_foreign_weights" in metrics
    assert metric(metrics, "vllm:kvshrink_foreign_weights") == 0
    assert "vllm:kvshrink_ring_misses_total" in metrics
    assert metric(metrics, "vllm:kvshrink_compactions_total") >= 1
    assert metric(metrics, "vllm:kvshrink_tokens_evicted_total") > 0
    assert metric(metrics, "vllm:kvshrink_blocks_freed_total") > 0
    assert "vllm:kvshrink_fallbacks_total" in metrics
    assert "vllm:kvshrink_compression_ratio" in metrics
    # Where the time went, per phase, in the worker and the scheduler.
    for phase in ("capture", "scoring", "move", "event_read", "event_plan",
                  "event_pack", "event_write", "packed_batch", "packed_attention",
                  "scheduler"):
        assert metric(metrics, SECONDS, engine="0", phase=phase) > 0, phase
    # A bad per-request setting is refused with a 400 naming it.
    try:
        _post(base + "/v1/completions", {
            "model": model_path, "prompt": "hi", "max_tokens": 2,
            "vllm_xargs": {"kvshrink_budget": 7.5}})
        raise AssertionError("bad per-request budget accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400
        assert "budget" in e.read().decode()
    # The engine's periodic log line carries the counters too.
    deadline = time.time() + 20
    while "KV shrink:" not in server.log_tail(10**7):
        assert time.time() < deadline, "no 'KV shrink:' line in the engine log"
        time.sleep(1)
    assert "fallbacks; phases: " in server.log_tail(10**7)
