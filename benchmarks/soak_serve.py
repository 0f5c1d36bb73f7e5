#!/usr/bin/env python
"""Soak of ``vllm serve`` with vllm-kvshrink at a larger size than the test.

Starts ``vllm serve`` with a method on, sends ``--requests`` mixed requests from
``--clients`` concurrent streaming clients (normal, opted out, own budget,
disconnecting mid-stream, invalid arguments, too long to fit: see
vllm_kvshrink/lab/bench/soak.py), checks the server is healthy, that KV usage on
/metrics is back to 0 and the counters add up, then runs the same requests on
stock ``vllm serve`` and compares the opted-out requests token by token, a
difference being accepted only at a near-tie of both servers.

``--control`` also runs stock a second time and compares stock with stock under
the same concurrency, exactly: what batch-dependent arithmetic alone does.

    python benchmarks/soak_serve.py                              # 240 requests, 24 clients, fp32
    python benchmarks/soak_serve.py --dtype bfloat16 --control   # and stock vs stock in bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--pool-tokens", type=int, default=4096)
    ap.add_argument("--tie-margin", type=float, default=None,
                    help="logprob gap under which a different token is a near-tie "
                    "(default 1e-3 in fp32, 0.1 in bf16)")
    ap.add_argument("--control", action="store_true", help="also stock vs stock")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="ranks of the compressed server (stock runs on one; the "
                         "pool is --pool-tokens tokens on every rank)")
    ap.add_argument("--out", default="results/soak_serve")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_kvshrink.lab.assets import resolve_model
    from vllm_kvshrink.lab.bench import soak
    from vllm_kvshrink.lab.bench.launch import tp_thread_binding
    from vllm_kvshrink.lab.bench.server import Server
    from vllm_kvshrink.lab.bench.workload import kv_bytes_per_token

    model = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tie = args.tie_margin if args.tie_margin is not None else (
        1e-3 if args.dtype == "float32" else 0.1)
    max_len = args.pool_tokens + 1024  # stock needs a pool of max_model_len
    per_tok = kv_bytes_per_token(model, 4 if args.dtype == "float32" else 2)

    def serve_args(pool: int, tp: int = 1) -> list[str]:
        # vLLM's --kv-cache-memory-bytes is per rank; a rank holds 1/tp of a token
        extra = [] if tp == 1 else ["--tensor-parallel-size", str(tp),
                                    "--distributed-executor-backend", "mp"]
        return ["--dtype", args.dtype, "--max-model-len", str(max_len), "--block-size",
                "32", "--max-num-seqs", str(args.clients), "--enforce-eager",
                "--kv-cache-memory-bytes", str(pool * per_tok // tp)] + extra

    reqs = soak.build_requests(tok, args.requests, args.seed,
                               too_long_tokens=args.pool_tokens + 256)
    tp = args.tensor_parallel_size
    env = {"VLLM_KVSHRINK_METHOD": args.method, "VLLM_KVSHRINK_BUDGET": args.budget,
           "VLLM_KVSHRINK_SLACK_TOKENS": "32", **(tp_thread_binding(tp) if tp > 1 else {})}
    runs, times = {}, {}
    plan = [("kvshrink", args.pool_tokens, env, tp), ("stock", max_len + 64, {}, 1)]
    if args.control:
        plan.append(("stock_again", max_len + 64, {}, 1))
    final = ""
    for name, pool, e, ranks in plan:
        print(f"starting {name} (pool {pool} tokens, {args.dtype}, {ranks} rank(s)) ...",
              flush=True)
        with Server(model, serve_args(pool, ranks), e, out / f"{name}.log") as s:
            print(f"  healthy after {s.startup_s:.0f} s; {len(reqs)} requests from "
                  f"{args.clients} clients", flush=True)
            t0 = time.perf_counter()
            runs[name] = soak.drive(s, reqs, args.clients, progress=True)
            times[name] = time.perf_counter() - t0
            if name == "kvshrink":
                final = soak.settle(s)
                s.get("/health")
                print("  settled: no request running or waiting, KV usage 0", flush=True)
    report: dict = {"settings": vars(args), "tie_margin": tie, "seconds": times}
    try:
        report["soak"] = soak.check(reqs, runs["kvshrink"], final, runs["stock"], tie)
        ok = True
    except AssertionError as e:
        report["soak"] = {"failed": str(e)}
        ok = False
    if args.control:
        optout = [r for r in reqs if r.kind == "optout"]
        exact = sum(runs["stock"][r.idx].tokens != runs["stock_again"][r.idx].tokens
                    for r in optout)
        beyond = sum(soak.first_difference(runs["stock"][r.idx],
                                           runs["stock_again"][r.idx], tie) is not None
                     for r in optout)
        ours_exact = sum(runs["kvshrink"][r.idx].tokens != runs["stock"][r.idx].tokens
                         for r in optout)
        report["control"] = {"optout_requests": len(optout),
                             "stock_vs_stock_differ": exact,
                             "stock_vs_stock_beyond_near_tie": beyond,
                             "ours_vs_stock_differ": ours_exact}
    print(json.dumps(report, indent=1, default=str))
    (out / "soak_serve.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'soak_serve.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
