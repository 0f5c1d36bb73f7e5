"""`vllm serve` (the OpenAI server, multiprocess engine) with the plugin on:
the console command works under the CPU wheel, requests are compressed, and
the counters appear on /metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_vllm_serve_compresses_and_exports_metrics(tmp_path, model_path, tokenizer,
                                                   essay_prompts):
    vllm_cmd = shutil.which("vllm", path=str(Path(sys.executable).parent))
    assert vllm_cmd, "the vllm console command is not installed"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_KVSHRINK_")}
    env.update({"VLLM_KVSHRINK_METHOD": "snapkv", "VLLM_KVSHRINK_BUDGET": "96",
                "VLLM_KVSHRINK_SLACK_TOKENS": "16", "VLLM_LOG_STATS_INTERVAL": "1"})
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # serve's default: multiprocess
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [vllm_cmd, "serve", model_path, "--port", str(port), "--dtype", "bfloat16",
         "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20),
         "--block-size", "32", "--max-num-seqs", "4", "--enforce-eager"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + (tmp_path / "serve.log").read_text()[-4000:])
            try:
                _get(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError("server did not start in 300 s")
                time.sleep(2)
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
            metrics = _get(base + "/metrics")
            if (_metric(metrics, "vllm:kvshrink_tokens_merged_total") > 0
                    and _metric(metrics, "vllm:kvshrink_predictor_updates_total") > 0
                    and _metric(metrics, "vllm:kvshrink_tier_events_total") > 0
                    and 'form="int4_tok_rot"' in metrics
                    ) or time.time() > deadline:
                break
            time.sleep(1)
        assert _metric(metrics, "vllm:kvshrink_tier_events_total") >= 1
        assert _metric(metrics, "vllm:kvshrink_tokens_demoted_total") > 0
        assert 'vllm:kvshrink_bytes_held{engine="0",form="int4_tok_rot"}' in metrics
        assert _metric(metrics, "vllm:kvshrink_tokens_merged_total") > 0
        assert _metric(metrics, "vllm:kvshrink_predictor_updates_total") > 0
        assert 0 <= _metric(metrics, "vllm:kvshrink_predictor_recall") <= 1
        # The shipped weights were trained on this very model: nothing foreign.
        assert "vllm:kvshrink_foreign_weights" in metrics
        assert _metric(metrics, "vllm:kvshrink_foreign_weights") == 0
        assert "vllm:kvshrink_ring_misses_total" in metrics
        assert _metric(metrics, "vllm:kvshrink_compactions_total") >= 1
        assert _metric(metrics, "vllm:kvshrink_tokens_evicted_total") > 0
        assert _metric(metrics, "vllm:kvshrink_blocks_freed_total") > 0
        assert "vllm:kvshrink_fallbacks_total" in metrics
        assert "vllm:kvshrink_compression_ratio" in metrics
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
        while "KV shrink:" not in (tmp_path / "serve.log").read_text():
            assert time.time() < deadline, "no 'KV shrink:' line in the engine log"
            time.sleep(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
