#!/usr/bin/env python
"""Stock vLLM vs vllm-kvshrink on the same seeded workload, side by side.

Each engine runs in its own process (the plugin is configured per process) on
the same prompts -- windows of real essay text -- with the same KV pool, sized
to hold about ``--pool-seqs`` full sequences.  Prints a table and the ratios,
draws a PNG of running sequences and KV usage per engine step, and with
``--json`` writes the figures (``throughput_ratio``, ``max_running_ratio``).

    python benchmarks/bench_throughput.py                 # full (32 prompts)
    python benchmarks/bench_throughput.py --quick         # a few minutes
    python benchmarks/bench_throughput.py --pool-seqs 0   # ample memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model id/path ('default': SmolLM2-135M-Instruct)")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--slack", default="32", help="VLLM_KVSHRINK_SLACK_TOKENS")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=3000)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--pool-seqs", type=float, default=8,
                    help="KV pool in full sequences (prompt+output of average length); "
                    "0 = ample (room for every sequence at once)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="short version (a few minutes)")
    ap.add_argument("--json", dest="json_path", help="write the figures here")
    ap.add_argument("--plot", default=None, help="PNG path (default beside --json or results/)")
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.min_len, args.max_len = 12, 600, 1200
        args.output_len, args.pool_seqs = 64, min(args.pool_seqs, 3) if args.pool_seqs else 0

    from transformers import AutoTokenizer

    from vllm_kvshrink.assets import resolve_model
    from vllm_kvshrink.bench.launch import run_side_by_side
    from vllm_kvshrink.bench.workload import (
        build_workload,
        greedy_spec,
        kv_bytes_per_token,
    )

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = build_workload(tok, args.num_prompts, args.min_len, args.max_len, args.seed)
    mean_seq = statistics.mean(len(p) for p in prompts) + args.output_len
    dtype_bytes = 4 if args.dtype == "float32" else 2
    per_tok = kv_bytes_per_token(model, dtype_bytes)
    max_len = max(len(p) for p in prompts) + args.output_len
    if args.pool_seqs > 0:
        pool_tokens = int(args.pool_seqs * mean_seq)
        pool_tokens = max(pool_tokens, max_len + args.block_size)  # one must fit
    else:
        pool_tokens = int(sum(len(p) for p in prompts) + args.num_prompts * (args.output_len + 2 * args.block_size))
    spec = greedy_spec(model, prompts, args.output_len, pool_tokens, args.block_size,
                       args.dtype, args.seed)
    print(f"workload: {len(prompts)} prompts of {args.min_len}-{args.max_len} essay tokens "
          f"(mean {mean_seq - args.output_len:.0f}), {args.output_len} output tokens; KV pool "
          f"{pool_tokens} tokens = {pool_tokens / mean_seq:.1f} mean sequences "
          f"({pool_tokens * per_tok / 2**20:.0f} MiB {args.dtype}), block {args.block_size}",
          flush=True)
    configs = [
        ("stock vLLM", {"VLLM_KVSHRINK_METHOD": "none"}),
        (f"kvshrink {args.method}@{args.budget}", {
            "VLLM_KVSHRINK_METHOD": args.method,
            "VLLM_KVSHRINK_BUDGET": args.budget,
            "VLLM_KVSHRINK_SLACK_TOKENS": args.slack,
        }),
    ]
    runs = run_side_by_side(spec, configs)

    (stock_name, stock), (ours_name, ours) = runs.items()
    rows = [
        ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
        ("max running seqs", "max_running", "{:d}"),
        ("preemptions", "preemptions", "{:d}"),
        ("engine steps", "steps", "{:d}"),
        ("time in steps with prefill (s)", "prefill_steps_s", "{:.1f}"),
        ("time in decode-only steps (s)", "decode_only_steps_s", "{:.1f}"),
        ("decode-only tokens/s", "decode_only_tokens_per_s", "{:.1f}"),
        ("peak KV usage", "peak_kv_usage", "{:.2f}"),
        ("wall time (s)", "elapsed_s", "{:.1f}"),
    ]
    print()
    print(f"| metric | {stock_name} | {ours_name} | ratio |")
    print("|---|---|---|---|")
    for label, key, fmt in rows:
        a, b = stock[key], ours[key]
        ratio = (b / a) if a else float("nan")
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}x |")
    k = ours.get("kvshrink", {})
    print(f"\nkvshrink: {k.get('compactions', 0)} compactions, {k.get('tokens_evicted', 0)} "
          f"tokens evicted, {k.get('blocks_freed', 0)} blocks freed, "
          f"{k.get('fallbacks', 0)} fallbacks; {k.get('compaction_s', 0):.1f} s spent compacting")
    same = sum(stock["outputs"][i]["token_ids"] == ours["outputs"][i]["token_ids"]
               for i in stock["outputs"])
    print(f"outputs identical to stock: {same}/{len(stock['outputs'])} "
          f"(compression changes what the model attends to)")
    throughput_ratio = ours["output_tokens_per_s"] / stock["output_tokens_per_s"]
    max_running_ratio = ours["max_running"] / max(stock["max_running"], 1)
    print(f"\nthroughput_ratio={throughput_ratio:.2f}  max_running_ratio={max_running_ratio:.2f}")
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    figures = {
        "machine": machine,
        "model": model,
        "args": vars(args),
        "pool_tokens": pool_tokens,
        "throughput_ratio": throughput_ratio,
        "max_running_ratio": max_running_ratio,
        "stock": {k2: v for k2, v in stock.items() if k2 != "outputs"},
        "kvshrink": {k2: v for k2, v in ours.items() if k2 != "outputs"},
    }
    out_dir = Path(args.json_path).parent if args.json_path else REPO / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json_path}")
    plot = Path(args.plot) if args.plot else out_dir / "bench_throughput.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for name, r in runs.items():
            axes[0].plot(r["running_trace"], label=name)
            axes[1].plot(r["usage_trace"], label=name)
        axes[0].set(xlabel="engine step", ylabel="running sequences",
                    title="Sequences running at once")
        axes[1].set(xlabel="engine step", ylabel="KV pool usage", title="KV-cache usage")
        axes[0].legend()
        fig.suptitle(f"{Path(model).name}, {len(prompts)} prompts, pool {pool_tokens} tokens "
                     f"({machine})", fontsize=9)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"wrote {plot}")
    except ImportError:
        print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
