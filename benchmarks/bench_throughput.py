#!/usr/bin/env python
"""Stock vLLM vs vllm-kvshrink on the same seeded workload, side by side.

Each engine runs in its own process (the plugin is configured per process) on
the same prompts -- windows of real essay text -- with the same KV pool in
bytes, sized to hold about ``--pool-seqs`` full sequences at the model's dtype
(``--dtype auto``: bf16 where the CPU computes it natively, else float32).  Prints a
table and the ratios, draws a PNG of running sequences and KV usage per engine
step, and with ``--json`` writes the figures (``throughput_ratio``,
``max_running_ratio``: the last engine vs stock).

With ``--storage`` naming forms other than bf16 (tiered storage, as
``VLLM_KVSHRINK_STORAGE``) four engines run, in this order: stock, stock
``kv_cache_dtype=fp8`` (vLLM's own 2x format, same pool bytes), eviction only
at the same byte budget, and tiered storage; the JSON adds
``throughput_ratio_fp8`` and ``max_running_ratio_fp8`` (tiered vs stock fp8).
Each plugin run also prints the seconds the plugin spent per phase beside the
run's wall time in steps (JSON: ``kvshrink_seconds`` and ``compression_share``
per run).

    python benchmarks/bench_throughput.py                 # full (32 prompts)
    python benchmarks/bench_throughput.py --quick         # a few minutes
    python benchmarks/bench_throughput.py --pool-seqs 0   # ample memory
    python benchmarks/bench_throughput.py --shape decode --budget 0.125 \
        --storage bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot   # decode-heavy, tiers
    python benchmarks/bench_throughput.py --num-prompts 8 --min-len 1800 --max-len 2200 \
        --output-len 64 --pool-seqs 4 --max-num-batched-tokens 2048 \
        --storage bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot   # ~2k prompts, served step budget
    python benchmarks/bench_throughput.py --quick --tensor-parallel-size 3 \
        --storage bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot   # every engine on 3 ranks

With ``--tensor-parallel-size`` every engine (stock included) runs on that
many ranks through vLLM's multiprocess executor, each rank's pool holding the
same tokens; where the machine has fewer NUMA nodes than ranks the ranks'
threads are bound round-robin to its CPUs (``VLLM_CPU_OMP_THREADS_BIND``,
unless set), which on a small machine makes the absolute figures meaningless
and leaves the ratios.
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

from vllm_kvshrink.lab.bench.machine import add_dtype_argument, chosen_dtype  # noqa: E402


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
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="vLLM's token budget per step (default: vLLM's own, 4096 for LLM "
                    "on a CPU; `vllm serve` uses 2048): a prompt longer than what is "
                    "left of it beside the decoding requests is prefilled in pieces")
    ap.add_argument("--storage", default="bf16",
                    help="VLLM_KVSHRINK_STORAGE (forms other than bf16: tiered storage, "
                    "also runs stock fp8 and eviction at the same bytes; stock fp8 is "
                    "left out, saying why, on a CPU whose vLLM backend refuses it)")
    ap.add_argument("--shape", choices=("prefill", "decode"), default="prefill",
                    help="prefill: long essay prompts, short answers (the defaults); "
                    "decode: short prompts, long generations (memory-bound decoding)")
    add_dtype_argument(ap)
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="ranks every engine runs on (vLLM's CPU tensor parallelism)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="short version (a few minutes)")
    ap.add_argument("--json", dest="json_path", help="write the figures here")
    ap.add_argument("--plot", default=None, help="PNG path (default beside --json or results/)")
    args = ap.parse_args()
    args.dtype = chosen_dtype(args.dtype)
    if args.shape == "decode":  # its own defaults for what was not given
        given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        for name, value in (("min_len", 128), ("max_len", 384), ("output_len", 1536)):
            if "--" + name.replace("_", "-") not in given:
                setattr(args, name, value)
    if args.quick:
        if args.shape == "decode":
            args.num_prompts, args.output_len = 12, 640
        else:
            args.num_prompts, args.min_len, args.max_len = 12, 600, 1200
            args.output_len = 64
        args.pool_seqs = min(args.pool_seqs, 3) if args.pool_seqs else 0
    from vllm_kvshrink.storage import parse_storage

    try:
        storage = parse_storage(args.storage, "--storage")
    except ValueError as e:
        ap.error(str(e))
    tiered = storage != ("bf16",)
    if args.tensor_parallel_size < 1:
        ap.error(f"--tensor-parallel-size={args.tensor_parallel_size}; allowed: 1 or more")

    from transformers import AutoTokenizer

    from vllm_kvshrink.lab.assets import resolve_model
    from vllm_kvshrink.lab.bench.launch import run_engine, tp_thread_binding
    from vllm_kvshrink.lab.bench.machine import fp8_kv_unavailable
    from vllm_kvshrink.lab.bench.workload import (
        build_workload,
        greedy_spec,
        kv_bytes_per_token,
    )
    from vllm_kvshrink.lab.bench.workload import pool_tokens as pool_for
    from vllm_kvshrink.serving.metrics.phases import breakdown, total

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = build_workload(tok, args.num_prompts, args.min_len, args.max_len, args.seed)
    mean_seq = statistics.mean(len(p) for p in prompts) + args.output_len
    dtype_bytes = 4 if args.dtype == "float32" else 2
    per_tok = kv_bytes_per_token(model, dtype_bytes)
    if args.pool_seqs > 0:
        pool_tokens = pool_for(prompts, args.output_len, args.pool_seqs, args.block_size)
    else:
        pool_tokens = int(sum(len(p) for p in prompts) + args.num_prompts * (args.output_len + 2 * args.block_size))
    tp = args.tensor_parallel_size
    spec = greedy_spec(model, prompts, args.output_len, pool_tokens, args.block_size,
                       args.dtype, args.seed, tensor_parallel_size=tp)
    if args.max_num_batched_tokens is not None:
        if args.max_num_batched_tokens < 1:
            ap.error(f"--max-num-batched-tokens={args.max_num_batched_tokens}; allowed: 1 "
                     f"or more")
        spec["llm"]["max_num_batched_tokens"] = args.max_num_batched_tokens
    binding = tp_thread_binding(tp)
    print(f"workload: {len(prompts)} prompts of {args.min_len}-{args.max_len} essay tokens "
          f"(mean {mean_seq - args.output_len:.0f}), {args.output_len} output tokens; KV pool "
          f"{pool_tokens} tokens = {pool_tokens / mean_seq:.1f} mean sequences "
          f"({pool_tokens * per_tok / 2**20:.0f} MiB {args.dtype}), block {args.block_size}"
          + (f"; {tp} tensor-parallel ranks" + (f" ({', '.join(f'{k}={v}' for k, v in binding.items())})"
                                                if binding else "") if tp > 1 else ""),
          flush=True)
    ours_env = {"VLLM_KVSHRINK_METHOD": args.method, "VLLM_KVSHRINK_BUDGET": args.budget,
                "VLLM_KVSHRINK_SLACK_TOKENS": args.slack}
    configs = [("stock vLLM", {"VLLM_KVSHRINK_METHOD": "none"}, {})]
    no_fp8 = fp8_kv_unavailable()
    if tiered and no_fp8:
        print(f"stock fp8 left out: {no_fp8}", flush=True)
    if tiered:
        configs += [] if no_fp8 else [
            ("stock fp8", {"VLLM_KVSHRINK_METHOD": "none"}, {"kv_cache_dtype": "fp8"})]
        configs += [
            (f"evict {args.method}@{args.budget}", ours_env, {}),
            (f"tiers {args.method}@{args.budget}",
             {**ours_env, "VLLM_KVSHRINK_STORAGE": ",".join(storage)}, {}),
        ]
    else:
        configs.append((f"kvshrink {args.method}@{args.budget}", ours_env, {}))
    runs = {}
    for name, env, llm_over in configs:
        print(f"running {name} ...", flush=True)
        run_spec = {**spec, "llm": {**spec["llm"], **llm_over}}
        runs[name] = run_engine(run_spec, {**env, **binding})
        print(f"  finished in {runs[name]['elapsed_s']:.0f} s of steps (engine start "
              f"{runs[name]['startup_s']:.0f} s)", flush=True)

    for r in runs.values():  # sustained concurrency, not only the peak
        r["median_running"] = (statistics.median(r["running_trace"])
                               if r["running_trace"] else 0.0)
    names = list(runs)
    stock_name, stock = names[0], runs[names[0]]
    ours_name, ours = names[-1], runs[names[-1]]
    rows = [
        ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
        ("max running seqs", "max_running", "{:d}"),
        ("median running seqs (over steps)", "median_running", "{:.1f}"),
        ("preemptions", "preemptions", "{:d}"),
        ("engine steps", "steps", "{:d}"),
        ("time in steps with prefill (s)", "prefill_steps_s", "{:.1f}"),
        ("time in decode-only steps (s)", "decode_only_steps_s", "{:.1f}"),
        ("peak KV usage", "peak_kv_usage", "{:.2f}"),
        ("wall time (s)", "elapsed_s", "{:.1f}"),
    ]
    print()
    print("| metric | " + " | ".join(names) + f" | {ours_name} / {stock_name} |")
    print("|---" * (len(names) + 2) + "|")
    for label, key, fmt in rows:
        a, b = stock[key], ours[key]
        ratio = (b / a) if a else float("nan")
        cells = " | ".join(fmt.format(runs[n][key]) for n in names)
        print(f"| {label} | {cells} | {ratio:.2f}x |")
    for n in names[1:]:
        k = runs[n].get("kvshrink")
        if not k:
            continue
        held = runs[n].get("peak_bytes_held") or {}
        print(f"\n{n}: {k.get('compactions', 0)} compactions, {k.get('tier_events', 0)} "
              f"tier events, {k.get('tokens_evicted', 0)} tokens evicted, "
              f"{k.get('tokens_demoted', 0)} demoted, {k.get('blocks_freed', 0)} blocks "
              f"freed, {k.get('fallbacks', 0)} fallbacks; {k.get('compaction_s', 0):.1f} s "
              f"in events" + (f"; peak bytes held " + ", ".join(
                  f"{f} {b / 2**20:.1f} MiB" for f, b in held.items()) if held else ""))
        spent = runs[n].get("kvshrink_seconds") or {}
        print(f"  plugin phases: {breakdown(spent) or '-'} = {total(spent):.2f} s of "
              f"{runs[n]['elapsed_s']:.1f} s in steps ({runs[n]['compression_share']:.1%})")
    same = sum(stock["outputs"][i]["token_ids"] == ours["outputs"][i]["token_ids"]
               for i in stock["outputs"])
    print(f"outputs identical to stock: {same}/{len(stock['outputs'])} "
          f"(compression changes what the model attends to)")
    throughput_ratio = ours["output_tokens_per_s"] / stock["output_tokens_per_s"]
    max_running_ratio = ours["max_running"] / max(stock["max_running"], 1)
    median_running_ratio = ours["median_running"] / max(stock["median_running"], 1e-9)
    print(f"\nthroughput_ratio={throughput_ratio:.2f}  max_running_ratio={max_running_ratio:.2f}")
    extra = {}
    if tiered:
        evict = runs[names[-2]]
        fp8 = runs.get("stock fp8")
        extra = {} if fp8 is None else {
            "throughput_ratio_fp8": ours["output_tokens_per_s"] / fp8["output_tokens_per_s"],
            "max_running_ratio_fp8": ours["max_running"] / max(fp8["max_running"], 1),
            "median_running_ratio_fp8": ours["median_running"] / max(fp8["median_running"],
                                                                      1e-9),
        }
        extra.update({
            "throughput_ratio_evict": ours["output_tokens_per_s"] / evict["output_tokens_per_s"],
            "max_running_ratio_evict": ours["max_running"] / max(evict["max_running"], 1),
        })
        print("  ".join(f"{k}={v:.2f}" for k, v in extra.items()))
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    figures = {
        "machine": machine,
        "model": model,
        "args": vars(args),
        "pool_tokens": pool_tokens,
        "throughput_ratio": throughput_ratio,
        "max_running_ratio": max_running_ratio,
        "median_running_ratio": median_running_ratio,
        **extra,
        "stock": {k2: v for k2, v in stock.items() if k2 != "outputs"},
        "kvshrink": {k2: v for k2, v in ours.items() if k2 != "outputs"},
        "runs": {n: {k2: v for k2, v in r.items() if k2 != "outputs"}
                 for n, r in runs.items()},
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
