"""Seeded workloads of real text, and KV sizes, shared by the benchmark and demo."""

from __future__ import annotations

import json
import random
from pathlib import Path


def build_workload(tokenizer, n: int, min_len: int, max_len: int, seed: int):
    from vllm_kvshrink.lab.assets import load_essays

    stream: list[int] = []
    for essay in load_essays():
        stream += tokenizer(essay, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        start = rng.randint(0, len(stream) - length - 1)
        prompts.append(stream[start : start + length])
    return prompts


def kv_bytes_per_token(model_path: str, dtype_bytes: int) -> int:
    """One token's K + V over every layer and KV head of the model at
    ``model_path`` (its ``config.json``), at ``dtype_bytes`` per element."""
    from vllm_kvshrink.policy.nbytes import token_bytes

    cfg = json.loads(Path(model_path, "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return token_bytes(cfg["num_hidden_layers"] * cfg["num_key_value_heads"], head_dim,
                       dtype_bytes)


def pool_tokens(prompts: list[list[int]], output_len: int, pool_seqs: float,
                block_size: int) -> int:
    """A KV pool of ``pool_seqs`` mean sequences (prompt + output) of
    ``prompts``, in tokens, never below the longest one plus a block (one
    sequence must fit)."""
    mean_seq = sum(len(p) for p in prompts) / len(prompts) + output_len
    longest = max(len(p) for p in prompts) + output_len
    return max(int(pool_seqs * mean_seq), longest + block_size)


def greedy_spec(model: str, prompts: list[list[int]], output_len: int, pool_tokens: int,
                block_size: int, dtype: str = "bfloat16", seed: int = 0,
                tensor_parallel_size: int = 1) -> dict:
    """An :mod:`engine_run` spec: greedy decoding of ``prompts`` (token ids) on a
    KV pool of ``pool_tokens`` tokens; every prompt may run at once.  With
    ``tensor_parallel_size`` ranks (vLLM's multiprocess executor) each rank's
    pool holds the same ``pool_tokens`` (vLLM's pool bytes are per rank, and a
    rank holds ``1 / tensor_parallel_size`` of each token)."""
    dtype_bytes = 4 if dtype == "float32" else 2
    max_len = max(len(p) for p in prompts) + output_len
    llm = dict(
        model=model, dtype=dtype, max_model_len=max_len + block_size,
        kv_cache_memory_bytes=(pool_tokens * kv_bytes_per_token(model, dtype_bytes)
                               // tensor_parallel_size),
        block_size=block_size, max_num_seqs=len(prompts), enforce_eager=True,
        seed=seed,
    )
    if tensor_parallel_size > 1:
        llm.update(tensor_parallel_size=tensor_parallel_size,
                   distributed_executor_backend="mp")
    return {
        "llm": llm,
        "prompts": [{"prompt_token_ids": p} for p in prompts],
        "sampling": {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True},
        "progress": True,
    }
