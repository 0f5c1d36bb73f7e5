#!/usr/bin/env python
"""Kept-token agreement between the engine and the research path, fp32 and bf16.

    python benchmarks/bench_agreement.py [--json docs/results/agreement.json]
    python benchmarks/bench_agreement.py --storage bf16,int4_tok_rot,int2_tok_rot \
        --budget 0.2 --json docs/results/agreement_tiers.json      # tiered storage

For each served method: the share of kept (layer, KV head, position) entries
the two paths have in common per compression event (min and mean), with
tiered storage also the share kept *in the same form*, and whether the greedy
tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ["streaming", "h2o", "snapkv", "tova", "knorm", "ema", "temporal", "semantic",
           "temporal+semantic"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--json", default="")
    ap.add_argument("--storage", default="bf16", help="VLLM_KVSHRINK_STORAGE")
    ap.add_argument("--budget", default="96",
                    help="tokens, or a fraction (with a tiered --storage: of the bf16 bytes)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-tokens", type=int, default=40)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from vllm_kvshrink.lab.assets import default_model_path, load_essays
    from vllm_kvshrink.lab.bench.agreement import compare

    mp = default_model_path()
    tok = AutoTokenizer.from_pretrained(mp)
    essays = load_essays()
    methods = args.methods.split(",")
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    prompts = [tok(essays[3 + i], add_special_tokens=False)["input_ids"][: args.tokens]
               for i in range(len(methods))]
    rows = []
    for dtype in args.dtypes.split(","):
        rows += compare(mp, dtype, methods, prompts, progress=True, budget=budget,
                        storage=args.storage, max_tokens=args.max_tokens)
    print(f"\nstorage {args.storage}, budget {args.budget}, {args.max_tokens} new tokens")
    print("\n| method | dtype | events | kept agreement min | mean | same form min "
          "| greedy tokens equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        form = f"{r['level_min']:.4f}" if r.get("level_min") is not None else "-"
        print(f"| {r['method']} | {r['dtype']} | {r['engine_events']} | "
              f"{r['agreement_min']:.4f} | {r['agreement_mean']:.4f} | {form} | "
              f"{'yes' if r['tokens_equal'] else 'no (from token ' + str(r['first_token_diff']) + ')'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
