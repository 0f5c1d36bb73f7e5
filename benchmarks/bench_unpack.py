#!/usr/bin/env python
"""What a tier event pays to read a request's packed tokens: the C++ unpack
(``kernels.cpu_ext.unpack``, ``csrc/cpu/unpack.cpp``, what the engine's event
read calls) against the PyTorch one (``kernels.quant.unpack``, which it
replaced there), on the same pages.

One request of the default model's shape (30 layers x 3 KV heads = 90 rows,
D = 64, block 32, bf16 pages): ``--tokens`` packed tokens per row in one
form, unpacked to float32 keys and values, rotated back for rotated forms.
Times are medians of ``--repeats`` calls after a warm-up, in ``--threads``
threads (the engine's event runs in the worker's torch threads).  Each case
first checks that both give the same values (rotated forms to float32
rounding: butterflies here, a matmul there).

    python benchmarks/bench_unpack.py            # every per-token form, 1 and 2 threads
    python benchmarks/bench_unpack.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FORMS = ("int8_tok", "int4_tok", "int2_tok", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=90, help="layers x KV heads (default 30 x 3)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1536,
                    help="packed tokens per row (default: 3/4 of a 2k-token request)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="three forms, 1 thread, 5 repeats")
    ap.add_argument("--json", dest="json_path", help="write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.forms, args.threads, args.repeats = "int8_tok,int4_tok_rot,int2_tok_rot", "1", 5

    import torch

    from vllm_kvshrink.kernels import cpu_ext, quant
    from vllm_kvshrink.lab.bench.machine import cpu_model
    from vllm_kvshrink.storage.paged import paged_form

    if not cpu_ext.load():
        print(f"the C++ kernel did not build: {cpu_ext.unavailable_reason()}")
        return 1
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in FORMS]
    if bad:
        ap.error(f"--forms: {', '.join(bad)} not allowed; allowed: {', '.join(FORMS)}")
    threads = [int(t) for t in args.threads.split(",")]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(args.rows, args.tokens, args.head_dim, generator=g)
    v = torch.randn(args.rows, args.tokens, args.head_dim, generator=g)
    rows = []
    print(f"{args.rows} rows x {args.tokens} packed tokens, D={args.head_dim}, block "
          f"{args.block_size}, bf16 pages; median of {args.repeats} calls; {cpu_model()}")
    print("| form | threads | PyTorch (ms) | C++ (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for form in forms:
        pf = paged_form(form, args.head_dim, args.block_size, 2)
        pages = quant.pack(pf, k, v)
        want = quant.unpack(pf, pages, args.tokens)
        got = cpu_ext.unpack(pf, pages, args.tokens)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=4e-6 * float(b.abs().max()))
        for t in threads:
            torch.set_num_threads(t)
            ref = _median_ms(lambda: quant.unpack(pf, pages, args.tokens), args.repeats)
            ext = _median_ms(lambda: cpu_ext.unpack(pf, pages, args.tokens), args.repeats)
            rows.append({"form": form, "threads": t, "torch_ms": ref, "cpp_ms": ext,
                         "speedup": ref / ext})
            print(f"| {form} | {t} | {ref:.2f} | {ext:.2f} | {ref / ext:.1f}x |", flush=True)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(
            {"machine": cpu_model(), "args": vars(args), "rows": rows}, indent=1))
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
