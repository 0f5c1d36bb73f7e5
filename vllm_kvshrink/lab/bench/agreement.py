"""Engine path vs research path: do they keep the same tokens?

One engine run serves one request per method (each request picks its method
through ``extra_args``), recording every compaction; the transformers research
path then runs the same prompt under the same config.  Per method: the share
of kept (layer, KV head, position) entries the two paths have in common at
each event, and whether the greedy tokens are identical.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.lab.bench.launch import run_engine
from vllm_kvshrink.lab.hf.research import ResearchRunner, kept_agreement
from vllm_kvshrink.policy.record import load_events

#: Learned methods run frozen here: online training makes each path's
#: weights depend on its own (fp-noisy) history.
FROZEN = {"online": False}


def method_args(method: str) -> dict:
    return dict(FROZEN) if ("temporal" in method or "semantic" in method) else {}


def level_agreement(a: dict, b: dict) -> float:
    """Share of (layer, head, position, form) entries two tier events have in
    common (1.0: the same tokens kept, each in the same form)."""
    def entries(e):
        return {(i, j, p, lv) for i, (kr, lr) in enumerate(zip(e["kept"], e["level"]))
                for j, (ks, ls) in enumerate(zip(kr, lr)) for p, lv in zip(ks, ls)}
    ea, eb = entries(a), entries(b)
    return len(ea & eb) / max(1, len(ea))


def compare(model_path: str, dtype: str, methods: list[str], prompts: list[list[int]],
            max_tokens: int = 40, budget: int | float = 96, slack: int = 16,
            block_size: int = 32, hf_model=None, progress: bool = False,
            storage: str = "bf16") -> list[dict]:
    """One engine run, then the research path per method.  With a tiered
    ``storage`` (and a fractional ``budget``) events also compare each kept
    token's form (``level_min``)."""
    with tempfile.TemporaryDirectory() as rec:
        spec = {
            "llm": dict(model=model_path, dtype=dtype, max_model_len=2048,
                        kv_cache_memory_bytes=256 << 20, block_size=block_size,
                        max_num_seqs=16, enforce_eager=True, seed=0,
                        # Every prompt prefilled whole in the first step, as
                        # the research path does (no compaction between chunks).
                        max_num_batched_tokens=max(2048, sum(map(len, prompts)))),
            # One distinct prompt per method: a prefix-cache hit would leave
            # the engine's observation window without the cached tokens'
            # queries (they are never computed for that request).
            "prompts": [{"prompt_token_ids": prompts[i]} for i in range(len(methods))],
            "per_request_extra": {str(i): {"method": m, "method_args": method_args(m)}
                                  for i, m in enumerate(methods)},
            "sampling": {"max_tokens": max_tokens, "temperature": 0.0,
                         "ignore_eos": True},
            "check_invariants": True,
        }
        env = {"VLLM_KVSHRINK_METHOD": "snapkv", "VLLM_KVSHRINK_BUDGET": str(budget),
               "VLLM_KVSHRINK_STORAGE": storage,
               "VLLM_KVSHRINK_SLACK_TOKENS": str(slack),
               "VLLM_KVSHRINK_RECORD_DIR": rec, "VLLM_KVSHRINK_STRICT": "1"}
        t0 = time.time()
        result = run_engine(spec, env)
        events = load_events(rec)
        if progress:
            print(f"[agreement] engine ({dtype}, {len(methods)} methods): "
                  f"{time.time() - t0:.0f}s", flush=True)
    if hf_model is None:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype)).eval()
    rows = []
    for i, m in enumerate(methods):
        prompt = prompts[i]
        t0 = time.time()
        cfg = KVShrinkConfig(method=m, budget=budget, slack_tokens=slack,
                             method_args=method_args(m), storage=storage)
        res = ResearchRunner(hf_model, cfg, block_size=block_size).run(
            prompt, max_new_tokens=max_tokens)
        eng = events.get(str(i), [])
        tokens = prompt + result["outputs"][str(i)]["token_ids"]
        pairs = [(a, b) for a, b in zip(eng, res.events)
                 if a["logical_len"] == b["logical_len"]]
        agree = [kept_agreement(a["kept"], b["kept"]) for a, b in pairs]
        levels = [level_agreement(a, b) for a, b in pairs if "level" in a and "level" in b]
        rows.append({
            "method": m, "dtype": dtype,
            "engine_events": len(eng), "research_events": len(res.events),
            "matched_events": len(agree),
            "agreement_min": min(agree) if agree else None,
            "agreement_mean": sum(agree) / len(agree) if agree else None,
            "level_min": min(levels) if levels else None,
            "counts_equal": all(a.get("counts") == b.get("counts") for a, b in pairs),
            "tokens_equal": res.token_ids == tokens,
            "first_token_diff": next((j for j, (a, b) in enumerate(zip(res.token_ids, tokens))
                                      if a != b), None),
            "fallbacks": result["kvshrink"]["fallbacks"],
        })
        if progress:
            print(f"[agreement] {m} ({dtype}): {json.dumps(rows[-1])} "
                  f"{time.time() - t0:.0f}s", flush=True)
    return rows
