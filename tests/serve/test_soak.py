"""A small soak of `vllm serve` with the plugin (the large one:
benchmarks/soak_serve.py): 16 concurrent streaming clients, mixed requests,
disconnects, opt-outs, per-request budgets, invalid requests answered 400; at
the end the server is healthy, no block leaked, the counters add up, and the
opted-out requests equal stock `vllm serve` (up to near-ties of both servers,
see vllm_kvshrink/lab/bench/soak.py).  The small soak's server then answers
the API and metrics checks of serve_checks.py (one server start for both)."""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.bench import soak
from vllm_kvshrink.lab.bench.server import Server
from vllm_kvshrink.lab.bench.workload import kv_bytes_per_token

import serve_checks

pytestmark = pytest.mark.engine

POOL_TOKENS = 2560
MAX_LEN = 4096


def _args(model_path: str, pool_tokens: int, tp: int = 1) -> list[str]:
    """Server arguments; the pool holds ``pool_tokens`` tokens on every rank
    (vLLM's ``--kv-cache-memory-bytes`` is per rank, a rank holds ``1 / tp``
    of a token's bytes)."""
    return ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--block-size", "32",
            "--max-num-seqs", "16", "--enforce-eager", "--kv-cache-memory-bytes",
            str(pool_tokens * kv_bytes_per_token(model_path, 4) // tp)]


def test_soak_small(tmp_path, model_path, tokenizer, essay_prompts):
    # 40 requests: every kind, four opt-outs to compare with stock
    reqs = soak.build_requests(tokenizer, 40, seed=0, too_long_tokens=3000, max_len=500)
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
    # Stock serves only what it is compared on: the opted-out requests (their
    # tokens may differ from ours only at a near-tie of both servers, whatever
    # the batch).  It needs a pool that holds one max_model_len sequence to start.
    optout = [r for r in reqs if r.kind == "optout"]
    with Server(model_path, _args(model_path, MAX_LEN + 64), {}, tmp_path / "stock.log") as s:
        stock = soak.drive(s, optout, clients=16)
    summary = soak.check(reqs, ours, final, stock, tie_margin=1e-3)
    assert summary["completed"] >= 24 and summary["disconnected"] >= 1
    assert summary["optout_compared"] >= 4
    assert summary["tokens_evicted"] > 0


def test_soak_tensor_parallel(tmp_path, model_path, tokenizer):
    """`vllm serve --tensor-parallel-size 3` (one KV head per rank) with a
    method on: streaming clients, disconnects, opt-outs, invalid requests
    answered 400, and the counters add up with no fallback.  That a TP
    engine keeps what one rank keeps is tests/engine/test_engine_tp.py."""
    from vllm_kvshrink.lab.bench.launch import tp_thread_binding

    reqs = soak.build_requests(tokenizer, 24, seed=1, too_long_tokens=3000, max_len=400)
    env = {"VLLM_KVSHRINK_METHOD": "tova", "VLLM_KVSHRINK_BUDGET": "0.25",
           "VLLM_KVSHRINK_SLACK_TOKENS": "32", **tp_thread_binding(3)}
    args = _args(model_path, POOL_TOKENS, 3) + ["--tensor-parallel-size", "3",
                                             "--distributed-executor-backend", "mp"]
    with Server(model_path, args, env, tmp_path / "tp.log") as s:
        ours = soak.drive(s, reqs, clients=8)
        final = soak.settle(s)
        assert s.get("/health") == ""
        assert s.proc.poll() is None
    summary = soak.check(reqs, ours, final, None, tie_margin=1e-3)
    assert summary["completed"] >= 12 and summary["disconnected"] >= 1
    assert summary["tokens_evicted"] > 0
