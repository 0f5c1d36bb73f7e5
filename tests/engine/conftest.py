"""The stock run the engine tests compare with, made once per suite."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest

from vllm_kvshrink.lab.bench.launch import run_engine

from engine_checks import STOCK_TOKENS

#: tests/run.py names a folder both of its lanes share: the first lane that
#: needs the stock run makes it, the other reads it (a lock orders them)
SHARED_DIR = "KVSHRINK_TEST_SHARED_DIR"


def _once(spec: dict, env: dict) -> dict:
    """``run_engine(spec, env)``, or its result saved by another pytest
    process of this suite run."""
    shared = os.environ.get(SHARED_DIR)
    if not shared:
        return run_engine(spec, env)
    key = hashlib.sha256(json.dumps([spec, env], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(shared, f"engine-{key}.json")
    with open(Path(shared, f"engine-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return json.loads(path.read_text())
        result = run_engine(spec, env)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.rename(path)
        return result


@pytest.fixture(scope="session")
def stock(model_path, essay_prompts):
    """Stock vLLM (``VLLM_KVSHRINK_METHOD=none``: nothing patched), fp32,
    greedy, ``essay_prompts[:4]``, :data:`STOCK_TOKENS` tokens each.

    fp32: in bf16 vLLM's CPU kernel splits its work by the whole batch's
    sequence lengths (a neighbour's compacted cache changes the rounding), so
    a request's tokens there depend on its neighbours; in fp32 they do not
    beyond ties, and one stock run serves every comparison of requests on
    these prompts (alone, opted out, beside compressed or prefix-sharing
    neighbours)."""
    spec = {
        "llm": dict(model=model_path, dtype="float32", max_model_len=2048,
                    kv_cache_memory_bytes=256 << 20, block_size=32, max_num_seqs=8,
                    enforce_eager=True, seed=0),
        "prompts": [{"prompt_token_ids": p} for p in essay_prompts[:4]],
        "sampling": {"max_tokens": STOCK_TOKENS, "temperature": 0.0, "ignore_eos": True},
    }
    return _once(spec, {"VLLM_KVSHRINK_METHOD": "none"})


@pytest.fixture(scope="session")
def tier_prompts(tokenizer):
    """Three essays ``essay_prompts`` does not use (no prefix-cache hits
    between evicting and tiered requests), 500, 560 and 620 tokens."""
    from vllm_kvshrink.lab.assets import load_essays

    essays = load_essays()
    return [tokenizer(essays[12 + i], add_special_tokens=False)["input_ids"][:500 + 60 * i]
            for i in range(3)]
