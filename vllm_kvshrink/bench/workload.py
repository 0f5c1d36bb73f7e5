"""Seeded workloads of real text, and KV sizes, shared by the benchmark and demo."""

from __future__ import annotations

import json
import random
from pathlib import Path


def build_workload(tokenizer, n: int, min_len: int, max_len: int, seed: int):
    from vllm_kvshrink.assets import load_essays

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
    cfg = json.loads(Path(model_path, "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2 * dtype_bytes
