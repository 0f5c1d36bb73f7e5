#!/usr/bin/env python
"""Eviction's event cadence: throughput against ``VLLM_KVSHRINK_SLACK_TOKENS``.

A request is compacted back to its budget once it holds ``slack`` tokens
more than the budget, so the slack sets how often events happen (every
``slack`` decoded tokens per request) and how much a request holds between
them (up to ``budget + slack`` tokens).  A small slack means many small
events (each scores the whole cache and moves what it keeps); a large one
means fewer events but more bytes held, so fewer requests fit the pool.  This
runs stock vLLM once and the evicting engine once per slack, on the same
seeded decode-heavy workload and the same pool in bytes (each engine in its
own process), and prints output tokens/s, its ratio to stock, the median
running requests, the events (compactions, or tier events) and the seconds
they took; writes a JSON and a PNG of throughput against slack.  With
``--storage`` naming forms other than bf16 the sweep runs tiered storage too
(``VLLM_KVSHRINK_STORAGE``, budget a share of the bf16 bytes), each slack
once evicting and once tiered.  ``--dtype auto`` (the default) runs every
engine in bf16 where the CPU computes it natively and in float32 where it
does not (``bench_gemm_dtype.py``).

    python benchmarks/bench_slack.py                       # slacks 16..256
    python benchmarks/bench_slack.py --slacks 32,64 --quick
    python benchmarks/bench_slack.py --slacks 32,64,128 --quick \
        --storage bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot   # eviction and tiers
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_kvshrink.lab.bench.machine import (  # noqa: E402
    add_dtype_argument, chosen_dtype, cpu_model)
from vllm_kvshrink.serving.metrics.phases import EVENT_PHASES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--slacks", default="16,32,64,128,256")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--output-len", type=int, default=768)
    ap.add_argument("--pool-seqs", type=float, default=3)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--storage", default="bf16",
                    help="VLLM_KVSHRINK_STORAGE; forms other than bf16 sweep tiers too")
    add_dtype_argument(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="8 prompts, 384 output tokens")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.output_len = 8, 384
    try:
        slacks = [int(x) for x in args.slacks.split(",") if x]
    except ValueError:
        ap.error(f"--slacks={args.slacks!r}: comma-separated whole numbers of tokens")
    if not slacks or min(slacks) < 0:
        ap.error(f"--slacks={args.slacks!r}: one or more token counts >= 0")
    from vllm_kvshrink.storage import parse_storage

    try:
        storage = parse_storage(args.storage, "--storage")
    except ValueError as e:
        ap.error(str(e))
    tiered = storage != ("bf16",)
    args.dtype = chosen_dtype(args.dtype)

    from transformers import AutoTokenizer

    from vllm_kvshrink.lab.assets import resolve_model
    from vllm_kvshrink.lab.bench.launch import run_engine
    from vllm_kvshrink.lab.bench.workload import build_workload, greedy_spec, pool_tokens

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = build_workload(tok, args.num_prompts, args.min_len, args.max_len, args.seed)
    mean_seq = statistics.mean(len(p) for p in prompts) + args.output_len
    pool = pool_tokens(prompts, args.output_len, args.pool_seqs, args.block_size)
    spec = greedy_spec(model, prompts, args.output_len, pool, args.block_size, args.dtype,
                       args.seed)
    print(f"{len(prompts)} prompts of {args.min_len}-{args.max_len} essay tokens, "
          f"{args.output_len} out, pool {pool} tokens ({pool / mean_seq:.1f} sequences), "
          f"{args.method} at {args.budget}, {args.dtype}", flush=True)
    runs = {}
    kinds = [("evict", {})] + ([("tiers", {"VLLM_KVSHRINK_STORAGE": ",".join(storage)})]
                               if tiered else [])
    configs = [("stock", {"VLLM_KVSHRINK_METHOD": "none"})] + [
        (f"{kind} slack {s}" if tiered else f"slack {s}",
         {"VLLM_KVSHRINK_METHOD": args.method, "VLLM_KVSHRINK_BUDGET": args.budget,
          "VLLM_KVSHRINK_SLACK_TOKENS": str(s), **extra})
        for kind, extra in kinds for s in slacks]
    for i, (name, env) in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {name} ...", flush=True)
        r = run_engine(spec, env)
        r["median_running"] = statistics.median(r["running_trace"]) if r["running_trace"] else 0
        runs[name] = {k: v for k, v in r.items() if k != "outputs"}
        print(f"  {r['output_tokens_per_s']:.1f} output tokens/s", flush=True)
    base = runs["stock"]["output_tokens_per_s"]
    rows = []
    for name, r in runs.items():
        k = r.get("kvshrink") or {}
        rows.append({"engine": name, "tokens_per_s": r["output_tokens_per_s"],
                     "ratio": r["output_tokens_per_s"] / base,
                     "median_running": r["median_running"], "preemptions": r["preemptions"],
                     "events": k.get("compactions", 0) + k.get("tier_events", 0),
                     "event_s": sum((k.get("seconds") or {}).get(p, 0.0) for p in EVENT_PHASES),
                     "wall_s": r["elapsed_s"]})
    print("\n| engine | output tokens/s | / stock | median running | preemptions | "
          "events | event seconds | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['median_running']:.1f} | {r['preemptions']} | {r['events']} | "
              f"{r['event_s']:.2f} | {r['wall_s']:.1f} |")
    for kind, _ in kinds:
        mine = [r for r in rows[1:] if not tiered or r["engine"].startswith(kind)]
        best = max(mine, key=lambda r: r["tokens_per_s"])
        print(f"best{' ' + kind if tiered else ''}: {best['engine']} ({best['ratio']:.2f}x stock)")
    out_dir = Path(args.json_path).parent if args.json_path else REPO / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"machine": cpu_model(), "model": model, "args": vars(args), "pool_tokens": pool,
             "rows": rows, "runs": runs}, indent=1))
        print(f"wrote {args.json_path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return 0
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (kind, _) in enumerate(kinds):
        ys = [r["tokens_per_s"] for r in rows[1 + i * len(slacks):1 + (i + 1) * len(slacks)]]
        ax.plot(slacks, ys, "o-", label=f"{args.method}, {kind}" if tiered else args.method)
    ax.axhline(base, color="gray", ls="--", label="stock vLLM")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="VLLM_KVSHRINK_SLACK_TOKENS", ylabel="output tokens/s",
           title=f"event cadence, budget {args.budget}, {args.dtype} ({cpu_model()})")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    plot = Path(args.plot) if args.plot else out_dir / "bench_slack.png"
    fig.savefig(plot, dpi=110)
    print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
