#!/usr/bin/env python
"""Kept-token agreement between the engine and the research path, fp32 and bf16.

    python benchmarks/bench_agreement.py [--json docs/agreement.json]

For each served method: the share of kept (layer, KV head, position) entries
the two paths have in common per compression event (min and mean), and
whether the greedy tokens are identical.
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
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from vllm_kvshrink.assets import default_model_path, load_essays
    from vllm_kvshrink.bench.agreement import compare

    mp = default_model_path()
    tok = AutoTokenizer.from_pretrained(mp)
    essays = load_essays()
    prompts = [tok(essays[3 + i], add_special_tokens=False)["input_ids"][: args.tokens]
               for i in range(len(METHODS))]
    rows = []
    for dtype in args.dtypes.split(","):
        rows += compare(mp, dtype, METHODS, prompts, progress=True)
    print("\n| method | dtype | events | kept agreement min | mean | greedy tokens equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['dtype']} | {r['engine_events']} | "
              f"{r['agreement_min']:.4f} | {r['agreement_mean']:.4f} | "
              f"{'yes' if r['tokens_equal'] else 'no (from token ' + str(r['first_token_diff']) + ')'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
