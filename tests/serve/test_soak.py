"""A small soak of `vllm serve` with the plugin (the large one:
benchmarks/soak_serve.py): 16 concurrent streaming clients, mixed requests,
disconnects, opt-outs, per-request budgets, invalid requests answered 400; at
the end the server is healthy, no block leaked, the counters add up, and the
opted-out requests equal stock vLLM's (the same prompts through the engine
without the plugin; up to near-ties of both, see
vllm_kvshrink/lab/bench/soak.py).  The small soak's server then answers
the API and metrics checks of serve_checks.py (one server start for both).
Tensor parallelism under compression, aborts and opt-outs included, is
tests/engine/test_engine_tp.py: the front end this soak drives is the same at
any TP size."""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.bench import soak
from vllm_kvshrink.lab.bench.launch import run_engine
from vllm_kvshrink.lab.bench.server import Server
from vllm_kvshrink.lab.bench.workload import kv_bytes_per_token

import serve_checks

pytestmark = pytest.mark.engine

POOL_TOKENS = 2560
MAX_LEN = 4096


def _args(model_path: str, pool_tokens: int) -> list[str]:
    """Server arguments; the pool holds ``pool_tokens`` tokens."""
    return ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--block-size", "32",
            "--max-num-seqs", "16", "--enforce-eager", "--kv-cache-memory-bytes",
            str(pool_tokens * kv_bytes_per_token(model_path, 4))]


def test_soak_small(tmp_path, model_path, tokenizer, essay_prompts):
    # 28 requests: every kind, three opt-outs to compare with stock
    reqs = soak.build_requests(tokenizer, 28, seed=0, too_long_tokens=3000, max_len=400)
    assert {r.kind for r in reqs} == set(soak.KINDS)
    env = {"VLLM_KVSHRINK_METHOD": "snapkv", "VLLM_KVSHRINK_BUDGET": "0.25",
           "VLLM_KVSHRINK_SLACK_TOKENS": "32", **serve_checks.ENV}
    with Server(model_path, _args(model_path, POOL_TOKENS), env, tmp_path / "ours.log") as s:
        ours = soak.drive(s, reqs, clients=16)
        final = soak.settle(s)
        assert s.get("/health") == ""
        assert s.proc.poll() is None
        # the soak's counters are taken: the same server answers the API checks
        serve_checks.check_api_and_metrics(s, model_path, tokenizer, essay_prompts)
    # Stock vLLM (the same engine, the plugin not loaded) serves only what it
    # is compared on: the opted-out requests' prompts, greedy, with the same
    # top-2 log-probabilities (their tokens may differ from ours only at a
    # near-tie of both engines, whatever the batch).
    summary = soak.check(reqs, ours, final, _stock(model_path, reqs), tie_margin=1e-3)
    assert summary["completed"] >= 16 and summary["disconnected"] >= 1
    assert summary["optout_compared"] >= 3
    assert summary["tokens_evicted"] > 0


def _stock(model_path: str, reqs: list) -> dict:
    """The opted-out requests through stock vLLM, as the soak's results."""
    optout = [r for r in reqs if r.kind == "optout"]
    spec = {"llm": dict(model=model_path, dtype="float32", max_model_len=MAX_LEN,
                        kv_cache_memory_bytes=(MAX_LEN + 64) * kv_bytes_per_token(model_path, 4),
                        block_size=32, max_num_seqs=16, enforce_eager=True, seed=0),
            "prompts": [r.prompt for r in optout],
            # greedy: each request's first max_tokens tokens are its own run's
            "sampling": {"temperature": 0.0, "ignore_eos": True, "logprobs": 2,
                         "max_tokens": max(r.max_tokens for r in optout)}}
    out = run_engine(spec, {"VLLM_PLUGINS": "no-such-plugin"})["outputs"]
    stock = {}
    for i, r in enumerate(optout):
        o, n = out[str(i)], r.max_tokens
        stock[r.idx] = soak.SoakResult(
            status=200, kind=r.kind, tokens=[f"token_id:{t}" for t in o["token_ids"][:n]],
            tops=[{f"token_id:{t}": lp for t, lp in top.items()} for top in o["logprobs"][:n]])
    return stock
