#!/usr/bin/env python
"""One decode step at equal work: stock vLLM vs compressed, same batch, same context.

``B`` sequences each holding ``C`` cached tokens (windows of real essay text)
decode together; the decode steps are timed once compression has happened,
so the figure is what a step costs with a compressed cache, not what an
event costs (``--events`` keeps the usual event cadence inside the timed
steps).  Four engines run one after the other, each in its own process, on
the same prompts: stock (the model's dtype, ``--dtype``), stock
``kv_cache_dtype=fp8`` (vLLM's own 2x format), eviction (``--method`` at ``--budget`` of the tokens) and tiered
storage (``--storage`` at ``--budget`` of the bf16 bytes).  The KV pool holds
every sequence at once in every engine, so every engine runs all ``B``.

A step is timed when no request is prefilling, all ``B`` run, and no
compression event completes in it; the last ``S`` such steps count.  Prints
the median step time and its ratio to stock, the KV bytes each engine's
requests hold, and (with the plugin's per-phase counters) where its time went;
writes a JSON and a PNG of the step times.

    python benchmarks/bench_step.py                 # B=8, C=2048, S=64
    python benchmarks/bench_step.py --quick         # B=4, C=1024, S=24
    python benchmarks/bench_step.py --events        # events inside the timed steps

``--dtype auto`` (the default) runs every engine in bf16 where the CPU
computes bf16 natively (AVX-512 BF16 or AMX) and in float32 where it does
not: there vLLM's matrix products fall back to torch's bf16 ``linear``, whose
time grows with every sequence of the step (``bench_gemm_dtype.py``), so
float32 is what a user would serve and the faster stock to compare with.
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
    add_dtype_argument, chosen_dtype, cpu_model, fp8_kv_unavailable)

#: steps decoded before the timed ones (compression happens in them)
WARM_STEPS = 16
#: tiered storage of the issue's target (int2 included)
DEFAULT_STORAGE = "bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot"


def timed_steps(trace: list, batch: int, steps: int, events: bool) -> list[float]:
    """Seconds of the last ``steps`` steps of ``trace`` (``[seconds,
    prefilling, running, events]`` rows) in which nothing prefilled, all
    ``batch`` requests ran and (unless ``events``) no event completed."""
    out = []
    prev = trace[0][3] if trace else 0
    for dt, prefilling, running, ev in trace:
        quiet = events or ev == prev
        if not prefilling and running == batch and quiet:
            out.append(dt)
        prev = ev
    return out[-steps:]


def stock_name(dtype: str) -> str:
    return "stock " + {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


def configs(args) -> list[tuple[str, dict, dict]]:
    """``(name, plugin env, LLM overrides)`` per engine, stock first."""
    slack = str(args.slack if args.events else 2 * (WARM_STEPS + args.steps) + args.block_size)
    ours = {"VLLM_KVSHRINK_METHOD": args.method, "VLLM_KVSHRINK_BUDGET": str(args.budget),
            "VLLM_KVSHRINK_SLACK_TOKENS": slack}
    off = {"VLLM_KVSHRINK_METHOD": "none"}
    fp8 = [] if fp8_kv_unavailable() else [("stock fp8", off, {"kv_cache_dtype": "fp8"})]
    return [
        (stock_name(args.dtype), off, {}),
        *fp8,
        (f"evict {args.method}@{args.budget}", ours, {}),
        (f"tiers {args.method}@{args.budget}",
         {**ours, "VLLM_KVSHRINK_STORAGE": args.storage}, {}),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default",
                    help="model id/path ('default': SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", "-B", type=int, default=8, help="sequences decoding together")
    ap.add_argument("--context", "-C", type=int, default=2048, help="cached tokens each")
    ap.add_argument("--steps", "-S", type=int, default=64, help="decode steps timed")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", type=float, default=0.25,
                    help="eviction: fraction of the tokens; tiers: of the bf16 bytes")
    ap.add_argument("--storage", default=DEFAULT_STORAGE, help="tiered storage's forms")
    ap.add_argument("--events", action="store_true",
                    help="time steps with events too (cadence --slack)")
    ap.add_argument("--slack", type=int, default=32,
                    help="VLLM_KVSHRINK_SLACK_TOKENS with --events (without: events "
                    "are spaced past the timed steps)")
    ap.add_argument("--block-size", type=int, default=32)
    add_dtype_argument(ap, "model and KV dtype of every engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="B=4, C=1024, S=24")
    ap.add_argument("--json", dest="json_path", help="write the figures here")
    ap.add_argument("--plot", default=None, help="PNG path (default beside --json or results/)")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.context, args.steps = 4, 1024, 24
    args.dtype = chosen_dtype(args.dtype)
    if not 0 < args.budget <= 1:
        ap.error(f"--budget={args.budget}: a fraction in (0, 1]")
    from vllm_kvshrink.storage import parse_storage

    try:
        parse_storage(args.storage, "--storage")
    except ValueError as e:
        ap.error(str(e))

    from transformers import AutoTokenizer

    from vllm_kvshrink.lab.assets import resolve_model
    from vllm_kvshrink.lab.bench.launch import run_engine
    from vllm_kvshrink.lab.bench.workload import build_workload, greedy_spec, kv_bytes_per_token

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = build_workload(tok, args.batch, args.context, args.context, args.seed)
    out_len = WARM_STEPS + args.steps + (0 if args.events else 8)
    pool = args.batch * (args.context + out_len + 2 * args.block_size)
    spec = greedy_spec(model, prompts, out_len, pool, args.block_size, args.dtype, args.seed)
    spec["trace_steps"] = True
    print(f"B={args.batch} sequences of C={args.context} essay tokens, {out_len} decode "
          f"steps ({args.steps} timed), budget {args.budget}, block {args.block_size}, "
          f"{args.dtype}", flush=True)
    no_fp8 = fp8_kv_unavailable()
    if no_fp8:
        print(f"stock fp8 left out: {no_fp8}", flush=True)
    runs = {}
    for name, env, over in configs(args):
        print(f"running {name} ...", flush=True)
        run = run_engine({**spec, "llm": {**spec["llm"], **over}}, env)
        run["timed"] = timed_steps(run["step_trace"], args.batch, args.steps, args.events)
        runs[name] = run
        print(f"  {len(run['timed'])} steps timed, median "
              f"{_median_ms(run['timed']):.1f} ms (engine start {run['startup_s']:.0f} s)",
              flush=True)
    stock_held = args.context + out_len  # tokens each stock request holds at the end
    for name, run in runs.items():
        if not run.get("peak_bytes_held"):  # stock: every token, at its dtype's bytes
            per_tok = kv_bytes_per_token(model, 1 if "fp8" in name else
                                         4 if args.dtype == "float32" else 2)
            run["peak_bytes_held"] = {"fp8" if "fp8" in name else args.dtype:
                                      args.batch * stock_held * per_tok}
    table = summarize(runs, args)
    print()
    print(render(table))
    figures = {"machine": cpu_model(), "model": model, "args": vars(args), "rows": table,
               "runs": {n: {k: v for k, v in r.items() if k != "outputs"}
                        for n, r in runs.items()}}
    out_dir = Path(args.json_path).parent if args.json_path else REPO / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json_path}")
    plot(runs, args, Path(args.plot) if args.plot else out_dir / "bench_step.png")
    short = [n for n, r in runs.items() if len(r["timed"]) < args.steps]
    if short:
        print(f"fewer than {args.steps} quiet steps in: {', '.join(short)}")
    return 0


def _median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs) if xs else float("nan")


def summarize(runs: dict, args) -> list[dict]:
    """One row per engine: median step (ms), its ratio to stock (the first), the
    10th / 90th percentiles, steps timed, KV bytes held per request (the
    plugin's peak; stock: every token at its dtype's bytes) and the plugin's
    seconds per phase over the whole run."""
    base = _median_ms(next(iter(runs.values()))["timed"])
    rows = []
    for name, r in runs.items():
        t = sorted(r["timed"])
        med = _median_ms(t)
        held = r.get("peak_bytes_held") or {}
        k = r.get("kvshrink") or {}
        rows.append({
            "engine": name, "median_ms": med, "ratio": med / base,
            "p10_ms": 1e3 * t[len(t) // 10] if t else float("nan"),
            "p90_ms": 1e3 * t[(9 * len(t)) // 10] if t else float("nan"),
            "steps": len(t),
            "held_mib_per_seq": sum(held.values()) / 2**20 / args.batch if held else None,
            "events": k.get("compactions", 0) + k.get("tier_events", 0),
            "fallbacks": k.get("fallbacks", 0),
            "seconds": k.get("seconds", {}),
        })
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| engine | median step (ms) | p10-p90 (ms) | vs stock | steps timed | "
             "KV held per seq (MiB) | events | fallbacks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        held = "-" if r["held_mib_per_seq"] is None else f"{r['held_mib_per_seq']:.1f}"
        lines.append(f"| {r['engine']} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-"
                     f"{r['p90_ms']:.1f} | {r['ratio']:.2f}x | {r['steps']} | {held} | "
                     f"{r['events']} | {r['fallbacks']} |")
    for r in rows:
        if r["seconds"]:
            parts = ", ".join(f"{p} {s:.2f}s" for p, s in sorted(r["seconds"].items()) if s)
            lines.append(f"\n{r['engine']}, plugin seconds over the whole run: {parts}")
    return "\n".join(lines)


def plot(runs: dict, args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(runs)
    ax.boxplot([[1e3 * x for x in runs[n]["timed"]] or [float("nan")] for n in names],
               showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set(ylabel="decode step (ms)",
           title=f"B={args.batch}, C={args.context}, budget {args.budget}, {args.dtype} "
                 f"({cpu_model()})")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
