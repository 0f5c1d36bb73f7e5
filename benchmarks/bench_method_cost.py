#!/usr/bin/env python
"""Cost of one compression event per method, against one decode step.

Real keys and queries: the embedded model (SmolLM2-135M, 30 layers, 3 KV
heads) reads ``--tokens`` tokens of essay text; each method then scores (and,
for merging methods, merges) that cache once, all layers, as the engine's
worker does -- median of ``--repeats`` events, stateful methods measured on
their second event (so the temporal predictor's online training step is
included).  The decode step is measured in the real engine, stock vLLM, one
sequence with the same context, in the same run.  Also times the two
micro-targets of the issue at Llama-3-8B shapes (8 KV heads): the predictor
over 4k tokens of one layer, and the semantic grouping of 512 tokens.

    python benchmarks/bench_method_cost.py [--json docs/results/method_cost.json]
    python benchmarks/bench_method_cost.py --micro-only [--json F]   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ["streaming", "knorm", "snapkv", "tova", "h2o", "ema", "temporal", "semantic",
           "temporal+semantic"]


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def real_observation(model_path, n_tokens, window):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvshrink.lab.assets import load_essays
    from vllm_kvshrink.config import KVShrinkConfig
    from vllm_kvshrink.lab.hf.research import ResearchRunner
    from vllm_kvshrink.methods import Observation

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(" ".join(load_essays()[:3]), add_special_tokens=False)["input_ids"][:n_tokens]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    c = ResearchRunner(model, KVShrinkConfig(obs_window=window)).run(ids).cache
    keys = torch.stack(c.keys).to(torch.bfloat16)
    values = torch.stack(c.values).to(torch.bfloat16)
    q = torch.stack([qq for _, qq in c.qring], dim=2).to(torch.bfloat16)
    qpos = torch.tensor([p for p, _ in c.qring])
    return Observation(keys, q, qpos, list(c.scales)), values


def decode_step_seconds(model_path, n_tokens):
    from vllm_kvshrink.lab.bench.launch import run_engine

    spec = {"llm": dict(model=model_path, dtype="bfloat16", max_model_len=n_tokens + 256,
                        kv_cache_memory_bytes=256 << 20, block_size=32, max_num_seqs=4,
                        enforce_eager=True, seed=0),
            "prompts": [{"prompt_token_ids": [100 + (i % 1000) for i in range(n_tokens)]}],
            "sampling": {"max_tokens": 64, "temperature": 0.0, "ignore_eos": True}}
    r = run_engine(spec, {"VLLM_KVSHRINK_METHOD": "none"})
    return r["decode_only_steps_s"] / max(1, 63)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--json", default="")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--micro-only", action="store_true",
                    help="only the two micro-targets (no model, no vLLM: runs on the GPU "
                         "machine)")
    args = ap.parse_args()
    import torch

    if args.micro_only:
        micro = micro_targets(torch)
        print_micro(micro, torch)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(micro, torch=torch.__version__),
                                                  indent=1) + "\n")
        return 0

    from vllm_kvshrink.lab.assets import default_model_path
    from vllm_kvshrink.config import KVShrinkConfig
    from vllm_kvshrink.methods import build_method, compress_event

    if args.threads:
        torch.set_num_threads(args.threads)
    mp = default_model_path()
    print(f"[cost] decode step of stock vLLM at {args.tokens} tokens ...", flush=True)
    step = decode_step_seconds(mp, args.tokens)
    print(f"[cost] reading {args.tokens} tokens of essays with the model ...", flush=True)
    obs0, values = real_observation(mp, args.tokens, 16)
    n = obs0.num_tokens
    keep = n // 4
    rows = []
    for name in args.methods.split(","):
        cfg = KVShrinkConfig(method=name)
        method = build_method(cfg)
        state: dict = {}
        if method.stateful:  # first event: state exists afterwards
            compress_event(method, copy.copy(obs0), state, keep + 64, 4, 32, values=values)
            # Back to n tokens: re-extend the state with the event's newest rows.
        def event():
            obs = copy.copy(obs0)
            obs._probs = obs._attn = None
            st = copy.deepcopy(state)
            if st:
                st["n"] = min(st.get("n", 0), n - 16)
            compress_event(method, obs, st, keep, 4, 32, values=values)

        event()  # warm
        sec = timed(event, args.repeats)
        rows.append({"method": name, "event_ms": sec * 1e3,
                     "ms_per_1k_tokens": sec * 1e3 * 1024 / n,
                     "decode_steps": sec / step})
        print(f"[cost] {name:<18} {sec * 1e3:8.1f} ms / event", flush=True)

    micro = micro_targets(torch)
    print(f"\nMachine: {platform.machine()} {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; model SmolLM2-135M (30 layers, 3 KV heads, bf16 "
          f"cache), {n} cached tokens, keep {keep}")
    print(f"Decode step (stock vLLM, 1 sequence, {args.tokens} context): "
          f"{step * 1e3:.1f} ms\n")
    print("| method | event (ms) | per 1k tokens (ms) | decode steps |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['event_ms']:.1f} | {r['ms_per_1k_tokens']:.1f} | "
              f"{r['decode_steps']:.2f} |")
    print()
    print_micro(micro, torch)
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
           "torch_threads": torch.get_num_threads(), "tokens": n, "keep": keep,
           "decode_step_ms": step * 1e3, "methods": rows, "micro": micro}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 3.5))
            ax.bar([r["method"] for r in rows], [r["decode_steps"] for r in rows])
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylabel("one event / one decode step")
            ax.set_title(f"Compression event cost, {n} tokens x 30 layers")
            plt.xticks(rotation=30, ha="right")
            fig.tight_layout()
            fig.savefig(Path(args.json).with_suffix(".png"), dpi=110)
        except ImportError:
            pass
    return 0


def print_micro(micro: dict, torch) -> None:
    print(f"Micro-targets ({micro['device']}, torch {torch.__version__}):")
    for k, v in micro.items():
        if k != "device":
            print(f"  {k}: {v:.2f} ms")


def micro_targets(torch) -> dict:
    """The issue's GPU targets, timed on whatever device this is."""
    from vllm_kvshrink.methods.semantic import SharedEmbedding, group_and_merge
    from vllm_kvshrink.methods.temporal import SharedPredictor

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    p = SharedPredictor()
    p.net.to(dev)
    rows = 8 * 4096  # Llama-3-8B: 8 KV heads x 4k tokens, one layer
    hist = torch.rand(rows, 16, device=dev)
    static = torch.rand(rows, 4, device=dev)

    def pred():
        p.predict(hist, static)
        sync()

    emb = SharedEmbedding(128)
    emb.proj = emb.proj.detach().to(dev)
    k = torch.randn(1, 8, 512, 128, device=dev)
    v = torch.randn_like(k)
    w = torch.rand(1, 8, 512, device=dev)
    keep = torch.stack([torch.randperm(512, device=dev)[:128].sort().values
                        for _ in range(8)])[None]
    counts = torch.ones(1, 8, 512, device=dev)

    def group():
        z = torch.nn.functional.normalize(k @ emb.proj, dim=-1)
        group_and_merge(k, v, w, keep, z, 0.5, counts)
        sync()

    pred()
    group()
    return {"device": dev if dev == "cpu" else torch.cuda.get_device_name(),
            "predictor_4k_tokens_8_heads_one_layer": timed(pred, 5) * 1e3,
            "semantic_grouping_512_tokens_8_heads": timed(group, 5) * 1e3}


if __name__ == "__main__":
    sys.exit(main())
