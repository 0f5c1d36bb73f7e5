#!/usr/bin/env python
"""What a tier event's plan costs, piece by piece, on real keys.

The embedded model (SmolLM2-135M, 30 layers, 3 KV heads) reads ``--tokens``
tokens of essay text (bf16 keys, values and the observation window's
queries, as the engine's worker holds them); then, as one tier event of the
default storage (``bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot``) does:

* ``score``: the importance method's scores over every layer
  (:func:`~vllm_kvshrink.methods.base.score_event`);
* ``distortion``: each form's attention distortion on six layers
  (:func:`~vllm_kvshrink.storage.policy.attention_distortion`), once with
  the forms' values from the one-pass C++ round trip (``quant.roundtrip``,
  what runs) and once from quantize-then-dequantize (the two-step path it
  replaced: codes packed, unpacked and dequantized in PyTorch); the two
  give the same numbers, which the script checks;
* ``plan``: the allocation itself (:func:`~vllm_kvshrink.storage.policy.plan_tiers`).

Median of ``--repeats`` calls, the two distortion paths alternating.

It also prints the pool blocks the plan occupies right after the event
(the plain row, then each packed form's pages, every one full but its last:
:class:`~vllm_kvshrink.storage.geometry.TierGeometry` at bf16) beside the
blocks eviction keeps at the same budget (its tokens rounded up to whole
blocks), for ``--block-sizes``: the budget counts token bytes, the pool lends
whole blocks, so a short request's partly filled pages are memory it holds
beyond its budget; and the plan re-made to count whole blocks
(``page_tokens``), with what that costs in distortion.

And what a price on kept tokens would cost (``--keep-costs``, the
``keep_cost`` of :func:`~vllm_kvshrink.storage.policy.plan_tiers`; the engine
runs 0): attention's work grows with the tokens a request keeps, whatever
their form, so the plan is re-made with each price and the table gives the
tokens kept against the distortion the allocation minimises, both as ratios
to the plan both paths run.

    python benchmarks/bench_tier_plan.py [--tokens 600,2048] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

STORAGE = ("bf16", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="600,2048")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--keep-costs", default="0.05,0.1,0.2",
                    help="prices on kept tokens to re-plan with (units: an unprotected "
                         "token's mean weight)")
    ap.add_argument("--block-sizes", default="16,32",
                    help="block sizes for the blocks-held table")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import torch

    from bench_method_cost import real_observation
    from vllm_kvshrink.config import KVShrinkConfig
    from vllm_kvshrink.kernels import cpu_lib
    from vllm_kvshrink.lab.assets import default_model_path
    from vllm_kvshrink.methods import build_method
    from vllm_kvshrink.methods.base import score_event
    from vllm_kvshrink.policy.cadence import budget_bytes
    from vllm_kvshrink.policy.nbytes import token_bytes
    from vllm_kvshrink.storage.geometry import TierGeometry
    from vllm_kvshrink.storage.policy import attention_distortion, levels_for, plan_tiers

    if not cpu_lib.load():
        print(f"the C++ library is not available: {cpu_lib.unavailable_reason()}",
              file=sys.stderr)
        return 1
    levels = levels_for(STORAGE)
    cfg = KVShrinkConfig(method=args.method, budget=0.25)  # the engine's defaults otherwise
    sink, recent = cfg.sink_tokens, cfg.recent_tokens
    fast = cpu_lib.roundtrip
    rows = []
    for n in [int(x) for x in args.tokens.split(",") if x]:
        print(f"[plan] reading {n} tokens of essays with the model ...", flush=True)
        obs, values = real_observation(default_model_path(), n, cfg.obs_window)
        method = build_method(cfg)
        l, h, n_held, d = obs.keys.shape
        budget = budget_bytes(cfg, n_held, token_bytes(l * h, d))  # a quarter of the bf16 bytes
        t = {"score": [], "distortion": [], "distortion_two_step": [], "plan": []}
        dist = {}
        for _ in range(args.repeats):
            obs._probs = obs._attn = None  # no probabilities cached from the last round
            t0 = time.perf_counter()
            scores = score_event(method, obs, {}, values)
            t["score"].append(time.perf_counter() - t0)
            for key, rt in (("distortion", fast), ("distortion_two_step", lambda *a: None)):
                cpu_lib.roundtrip = rt
                try:
                    t0 = time.perf_counter()
                    dist[key] = attention_distortion(obs, values, levels, sink, recent)
                    t[key].append(time.perf_counter() - t0)
                finally:
                    cpu_lib.roundtrip = fast
            t0 = time.perf_counter()
            plan = plan_tiers(scores, levels, budget, d, sink, recent, dist["distortion"])
            t["plan"].append(time.perf_counter() - t0)
        if dist["distortion"] != dist["distortion_two_step"]:
            print(f"the two distortion paths differ: {dist}", file=sys.stderr)
            return 1
        blocks = {}
        for bs in [int(x) for x in args.block_sizes.split(",") if x]:
            geo = TierGeometry(l, h, d, bs, 2)
            caps = [geo.capacity(name) for name in levels]
            blocks_of = lambda counts: sum(-(-c // k) for c, k in zip(counts, caps))  # noqa: E731
            held = blocks_of(plan.counts)
            evict = -(-cfg.target_tokens(n_held) // bs)
            paged = plan_tiers(scores, levels, budget, d, sink, recent, dist["distortion"],
                               page_tokens=caps)
            blocks[bs] = dict(tiers=held, eviction=evict,
                              plan_bytes_in_blocks=plan.nbytes / (held * bs * geo.token_bytes),
                              whole_pages=blocks_of(paged.counts),
                              whole_pages_kept=sum(paged.counts),
                              whole_pages_distortion_ratio=paged.distortion / plan.distortion)
        priced = []
        for price in [float(x) for x in args.keep_costs.split(",") if x]:
            p = plan_tiers(scores, levels, budget, d, sink, recent, dist["distortion"],
                           keep_cost=price)
            priced.append(dict(keep_cost=price, kept=sum(p.counts),
                               kept_ratio=sum(p.counts) / sum(plan.counts),
                               distortion_ratio=p.distortion / plan.distortion,
                               counts=dict(zip(levels, p.counts))))
        row = dict(tokens=n_held, distortion=dist["distortion"],
                   counts=dict(zip(levels, plan.counts)), blocks=blocks,
                   plan_distortion=plan.distortion, keep_cost=priced,
                   **{k + "_ms": 1e3 * statistics.median(v) for k, v in t.items()})
        rows.append(row)
    print(f"\n# one tier event's plan, {args.method}, storage {','.join(STORAGE)}, "
          f"25% of the bf16 bytes; median of {args.repeats} (ms)")
    print("| tokens | score | distortion | distortion, two-step | ratio | plan |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['score_ms']:.1f} | {r['distortion_ms']:.1f} | "
              f"{r['distortion_two_step_ms']:.1f} | "
              f"{r['distortion_ms'] / r['distortion_two_step_ms']:.2f}x | {r['plan_ms']:.1f} |")
    print("distortion per form (both paths equal) and tokens per form of the plan "
          "(per layer and KV head):")
    for r in rows:
        print(f"  {r['tokens']} tokens: " + ", ".join(
            f"{name} {x:.4f} ({r['counts'][name]})" for name, x in zip(levels, r["distortion"])))
    print("pool blocks held right after the event: the plan's pages (fill: its bytes over "
          "its blocks' bytes), eviction's tokens at the same budget, and the plan re-made "
          "to count whole blocks in its budget (page_tokens; the engine counts token bytes)")
    print("| tokens | block size | tiers | fill | eviction | whole-block plan | its tokens "
          "kept | its distortion / the byte plan's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for bs, b in r["blocks"].items():
            print(f"| {r['tokens']} | {bs} | {b['tiers']} | {b['plan_bytes_in_blocks']:.0%} | "
                  f"{b['eviction']} | {b['whole_pages']} | {b['whole_pages_kept']} | "
                  f"{b['whole_pages_distortion_ratio']:.2f}x |")
    print("a price on kept tokens (the engine runs 0): tokens kept and the plan's "
          "distortion, as ratios to the price-0 plan")
    print("| tokens | keep_cost | kept | kept ratio | distortion ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        for q in r["keep_cost"]:
            print(f"| {r['tokens']} | {q['keep_cost']:g} | {q['kept']} | "
                  f"{q['kept_ratio']:.2f} | {q['distortion_ratio']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = dict(command=" ".join(["python", "benchmarks/bench_tier_plan.py"]
                                     + sys.argv[1:]),
                    machine=platform.processor() or platform.machine(),
                    torch=torch.__version__, threads=torch.get_num_threads())
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
