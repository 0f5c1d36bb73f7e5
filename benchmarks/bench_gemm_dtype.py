#!/usr/bin/env python
"""The model's matrix products in one decode step, bf16 against fp32, on this CPU.

vLLM's CPU backend computes every linear layer through the product it picks
at load time (``dispatch_cpu_unquantized_gemm``: oneDNN, or torch's
``linear`` where oneDNN refuses the dtype).  This script builds the default
model's linear layers (q/k/v, o, gate/up, down per layer, and the LM head)
with random weights, lets vLLM's own dispatch choose each one's product, and
times one decode step's products at a batch of ``B`` sequences in each dtype:
what a step costs before any attention, and how that cost grows with the
batch.  Where the per-sequence cost stays flat, running more sequences (what
a compressed cache buys) cannot raise throughput.  Prints a table, writes a
JSON and a PNG.

    python benchmarks/bench_gemm_dtype.py --json docs/results/bench_gemm_dtype/bench_gemm_dtype.json
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

from vllm_kvshrink.lab.bench.machine import bf16_unaccelerated, cpu_model  # noqa: E402

DTYPES = ("bfloat16", "float32")


def layer_shapes(cfg) -> list[tuple[str, int, int, int]]:
    """``(name, out_features, in_features, count)`` of one forward's linear layers."""
    h, d = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    n = cfg.num_hidden_layers
    return [("qkv", qkv, h, n), ("o", h, cfg.num_attention_heads * d, n),
            ("gate_up", 2 * cfg.intermediate_size, h, n),
            ("down", h, cfg.intermediate_size, n), ("lm_head", cfg.vocab_size, h, 1)]


def build(shapes, dtype):
    """One vLLM-dispatched product per shape: ``(name, fn, in_features, count, how)``."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    out = []
    for name, n_out, n_in, count in shapes:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(n_out, n_in, dtype=dtype) * 0.02,
                                          requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        how = product_name(layer.cpu_linear)
        out.append((name, lambda x, lay=layer: lay.cpu_linear(x, lay.weight, None),
                    n_in, count, how))
    return out


def product_name(fn) -> str:
    """Which product vLLM's dispatch chose, from the names its closure calls."""
    names = set(getattr(getattr(fn, "__code__", None), "co_names", ()))
    for op, label in (("onednn_mm", "oneDNN"), ("weight_packed_linear_cpu", "sgl kernel"),
                      ("zentorch_linear_unary", "zentorch")):
        if op in names:
            return label
    return "torch linear (fallback)"


def time_step(products, batch: int, dtype, reps: int) -> tuple[float, dict]:
    """Median seconds of one step's products at ``batch`` rows, and the
    seconds per product name (one call x its count)."""
    import torch

    per = {}
    for name, fn, n_in, count, _ in products:
        x = torch.randn(batch, n_in, dtype=dtype)
        for _ in range(2):
            fn(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
        per[name] = statistics.median(ts) * count
    return sum(per.values()), per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default",
                    help="model id/path ('default': SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", default="1,2,4,8,16,32", help="batch sizes (comma-separated)")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per product")
    ap.add_argument("--json", dest="json_path", help="write the figures here")
    ap.add_argument("--plot", default=None, help="PNG path (default beside --json)")
    args = ap.parse_args()
    try:
        batches = [int(b) for b in args.batch.split(",")]
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--batch={args.batch!r}: positive integers separated by commas")

    import torch
    from transformers import AutoConfig

    from vllm_kvshrink.lab.assets import resolve_model

    model = resolve_model(args.model)
    shapes = layer_shapes(AutoConfig.from_pretrained(model))
    why = bf16_unaccelerated()
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; native bf16: "
          f"{'no (' + why + ')' if why else 'yes'}", flush=True)
    rows, how = [], {}
    for dt_name in DTYPES:
        dtype = getattr(torch, dt_name)
        products = build(shapes, dtype)
        how[dt_name] = sorted({p[4] for p in products})
        print(f"{dt_name}: {', '.join(how[dt_name])}", flush=True)
        for b in batches:
            total, per = time_step(products, b, dtype, args.reps)
            rows.append({"dtype": dt_name, "batch": b, "step_ms": 1e3 * total,
                         "ms_per_seq": 1e3 * total / b,
                         "per_product_ms": {k: 1e3 * v for k, v in per.items()}})
            print(f"  B={b}: {1e3 * total:.1f} ms", flush=True)
    print()
    print(render(rows, batches))
    figures = {"machine": cpu_model(), "model": model, "threads": torch.get_num_threads(),
               "bf16_unaccelerated": why, "product": how, "args": vars(args), "rows": rows}
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json_path}")
    png = (Path(args.plot) if args.plot else
           Path(args.json_path).with_suffix(".png") if args.json_path else None)
    if png:
        plot(rows, png)
    return 0


def render(rows: list[dict], batches: list[int]) -> str:
    by = {(r["dtype"], r["batch"]): r for r in rows}
    lines = ["| batch | bf16 step (ms) | fp32 step (ms) | bf16 / fp32 | bf16 per seq (ms) | "
             "fp32 per seq (ms) |", "|---|---|---|---|---|---|"]
    for b in batches:
        x, y = by[("bfloat16", b)], by[("float32", b)]
        lines.append(f"| {b} | {x['step_ms']:.1f} | {y['step_ms']:.1f} | "
                     f"{x['step_ms'] / y['step_ms']:.2f}x | {x['ms_per_seq']:.2f} | "
                     f"{y['ms_per_seq']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for dt in DTYPES:
        pts = [(r["batch"], r["step_ms"]) for r in rows if r["dtype"] == dt]
        ax.plot(*zip(*pts), marker="o", label=dt)
    ax.set(xscale="log", yscale="log", xlabel="sequences in the step",
           ylabel="linear layers per step (ms)", title=f"vLLM's CPU products ({cpu_model()})")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
