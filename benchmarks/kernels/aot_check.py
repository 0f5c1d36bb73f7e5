"""Compile every Triton kernel for a GPU, ahead of time, on a machine without one.

    python benchmarks/kernels/aot_check.py --out results/kernels_aot          # sm_90 (H100/H200)
    python benchmarks/kernels/aot_check.py --out /tmp/aot --arch 80 90 --quick

The host wrappers run on CPU tensors with the GPU configuration and record
their launches (``vllm_kvshrink.kernels.aot``); each distinct launch is then
compiled by Triton's NVIDIA backend to a cubin.  Cases: the GPU benchmark's
shapes (``shapes.LLAMA3_8B``, exactly what ``run_all.py`` launches) and, unless
``--quick``, awkward ones (block sizes 1/32/128, head dims 64/80/96/256,
fp32/bf16/fp8 caches, non-power-of-two groups, GQA ratios 1/3/4/7, one-query
windows).  Per compilation the table gives registers per thread, spilled bytes,
shared memory and the widest global load / store in the PTX.

Checks (exit status 1 when one fails): every case compiles and nothing spills;
on the benchmark shapes, the bandwidth-bound kernels move their data with
128-bit accesses (compaction: loads and stores; quantize: loads of ``x``;
dequantize: stores of ``x``) -- without them they cannot approach the copy
bandwidth.  This says nothing about speed itself: ``run_all.py`` measures that
on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

from shapes import LLAMA3_8B  # noqa: E402
from vllm_kvshrink.kernels import aot, quant  # noqa: E402
from vllm_kvshrink.lab.kernels import ops as lab  # noqa: E402

# Kernel -> which widest access must be 128 bits on the benchmark shapes.
WIDE = {"compact_kernel": ("ld", "st"), "quantize_kernel": ("ld",),
        "dequantize_kernel": ("st",)}


# --------------------------------------------------------------------------
# cases: (label, thunk) pairs; each thunk calls ops on CPU tensors
# --------------------------------------------------------------------------
def _compaction(label, L, H, D, bs, n, keep, dtype, staged):
    n_req = triton.cdiv(n, bs)
    n_blocks = 2 * n_req
    cache = torch.empty(L, n_blocks, 2, bs, H, D, dtype=dtype)
    src_table = torch.arange(n_req, dtype=torch.int32)
    idx = torch.arange(keep, dtype=torch.int32).expand(L, H, keep).contiguous()
    dst_table = src_table[: triton.cdiv(keep, bs)].clone()
    return label, lambda: lab.compact_kv(cache, src_table, idx, dst_table, "flash", staged=staged)


def _quantization(label, rows, n, D, bits, gs, axis, dtype, param_dtype=None):
    x = torch.empty(rows, n, D, dtype=dtype)

    def run():
        q = quant.quantize(x, bits, gs, axis=axis, param_dtype=param_dtype)
        quant.dequantize(q, bits, gs, axis=axis, dtype=dtype)

    return label, run


def _merge(label, H, n, D, groups, dtype):
    keys = torch.empty(H, n, D, dtype=dtype)
    w = torch.empty(H, n)
    grp = torch.zeros(H, n, dtype=torch.int64)
    return label, lambda: lab.merge_kv(keys, keys, w, grp, groups)


def _scoring(label, W, hq, hkv, D, bs, n, dtype, reduce, gqa_mean=True, causal=True, pool=1):
    n_blocks = triton.cdiv(n, bs)
    cache = torch.empty(n_blocks, 2, bs, hkv, D, dtype=dtype)
    table = torch.arange(n_blocks, dtype=torch.int32)
    q = torch.empty(W, hq, D, dtype=dtype)
    return label, lambda: lab.window_scores(q, cache, table, n, "flash", reduce=reduce,
                                          gqa_mean=gqa_mean, causal=causal, pool=pool)


def benchmark_cases(c: dict = LLAMA3_8B) -> list:
    """What ``run_all.py`` launches on a GPU, with its shapes."""
    L, H, D, bs, n = c["layers"], c["kv_heads"], c["head_dim"], c["block"], c["tokens"]
    keep = max(1, int(n * c["keep"]))
    cases = [_compaction(f"bench compaction {'staged' if s else 'in-place'}", L, H, D, bs, n,
                         keep, torch.float16, s) for s in (False, True)]
    for bits in (8, 4, 2):
        for axis in ("token", "channel"):
            cases.append(_quantization(f"bench int{bits} {axis}", L * H, n, D, bits, c["group"],
                                       axis, torch.float16))
    cases.append(_merge("bench merge", H, c["merge_tokens"], D,
                        max(1, int(c["merge_tokens"] * c["keep"])), torch.float16))
    for red in ("sum", "max"):
        cases.append(_scoring(f"bench scoring {red}", c["window"], c["q_heads"], H, D, bs, n,
                              torch.float16, red, pool=7 if red == "sum" else 1))
    return cases


def awkward_cases() -> list:
    return [
        _compaction("compaction bs1 fp16 odd keep", 2, 3, 128, 1, 37, 17, torch.float16, False),
        _compaction("compaction bs32 bf16 D64 keep1", 3, 2, 64, 32, 100, 1, torch.bfloat16, False),
        _compaction("compaction bs128 fp32 D80 staged", 2, 4, 80, 128, 300, 111, torch.float32,
                    True),
        _compaction("compaction fp8 D256", 2, 8, 256, 16, 200, 150, torch.float8_e4m3fn, False),
        _compaction("compaction D96 staged", 4, 8, 96, 16, 1000, 999, torch.float16, True),
        _quantization("int8 bf16 g128 token", 8, 33, 128, 8, 128, "token", torch.bfloat16),
        _quantization("int4 fp32 g64 channel", 4, 64, 80, 4, 64, "channel", torch.float32),
        _quantization("int2 fp16 g24 token", 5, 7, 96, 2, 24, "token", torch.float16),
        _quantization("int4 bf16 params", 8, 100, 128, 4, 32, "token", torch.bfloat16,
                      torch.bfloat16),
        _merge("merge bf16 D80", 4, 77, 80, 9, torch.bfloat16),
        _merge("merge fp32 D64", 2, 1000, 64, 500, torch.float32),
        _scoring("scoring one query, MHA", 1, 8, 8, 64, 16, 50, torch.float16, "max",
                 causal=False),
        _scoring("scoring bf16 GQA 7", 17, 28, 4, 128, 32, 300, torch.bfloat16, "sum",
                 gqa_mean=False),
        _scoring("scoring fp32 D80 bs1", 5, 6, 2, 80, 1, 20, torch.float32, "sum"),
    ]


# --------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, table.md")
    p.add_argument("--arch", type=int, nargs="+", default=[90],
                   help="compute capabilities as XY (90: H100/H200, 80: A100); default 90")
    p.add_argument("--quick", action="store_true", help="the benchmark shapes only")
    args = p.parse_args()
    bad = [a for a in args.arch if not 70 <= a <= 120]
    if bad:
        p.error(f"--arch {bad}: allowed are compute capabilities 70..120 written as XY")
    return args


def run(cases: list, archs: list[int], log=print) -> list[dict]:
    """Record each case's launches, compile each distinct one per arch; rows."""
    recorded = []
    for label, thunk in cases:
        with aot.record_launches() as launches:
            thunk()
        if not launches:
            raise RuntimeError(f"case {label!r} launched no kernel")
        recorded += [(label, launch) for launch in aot.distinct(launches)]
    rows = []
    total = len(recorded) * len(archs)
    for arch in archs:
        for label, launch in recorded:
            row = dict(case=label, arch=arch, kernel=launch.kernel.__name__, error=None)
            try:
                row.update(aot.compile_launch(launch, arch).row())
            except Exception as e:  # report every failure, not just the first
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            row["problems"] = problems(row)
            rows.append(row)
            log(f"[{len(rows)}/{total}] sm_{arch} {label}: {row['kernel']} "
                + (f"regs {row['registers']} spill {row['spill_bytes']} B, smem "
                   f"{row['shared_bytes']} B, ld/st {row['widest_load_bits']}/"
                   f"{row['widest_store_bits']} bit, {row['seconds']:.1f} s"
                   if row["error"] is None else f"FAILED {row['error']}")
                + (f"  <- {'; '.join(row['problems'])}" if row["problems"] else ""))
    return rows


def problems(row: dict) -> list[str]:
    if row["error"]:
        return ["does not compile"]
    out = []
    if row["spill_bytes"] != 0:
        out.append(f"spills {row['spill_bytes']} B")
    if row["case"].startswith("bench"):
        for access in WIDE.get(row["kernel"], ()):
            bits = row["widest_load_bits" if access == "ld" else "widest_store_bits"]
            if bits < 128:
                out.append(f"widest global {access} is {bits} bit, not 128")
    return out


def table(rows: list[dict]) -> str:
    lines = [f"Triton {triton.__version__}, torch {torch.__version__}; compiled ahead of time "
             "(no GPU needed).", "",
             "| case | arch | kernel | key constants | warps | regs | spill B | smem B | "
             "ld bits | st bits | compile s | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    skip = {"HEAD_DIM", "BLOCK_D"}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['case']} | sm_{r['arch']} | {r['kernel']} | | | | | | | | | "
                         f"FAIL: {r['error']} |")
            continue
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k not in skip)
        check = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(f"| {r['case']} | sm_{r['arch']} | {r['kernel']} | {consts} | "
                     f"{r['num_warps']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes']} | {r['widest_load_bits']} | "
                     f"{r['widest_store_bits']} | {r['seconds']:.2f} | {check} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    t0 = time.time()
    cases = benchmark_cases() + ([] if args.quick else awkward_cases())
    rows = run(cases, args.arch, log=lambda s: print(s, flush=True))
    md = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps(
        dict(triton=triton.__version__, torch=torch.__version__, arch=args.arch,
             seconds=time.time() - t0, rows=rows), indent=1, default=str) + "\n")
    print("\n" + md)
    bad = [r for r in rows if r["problems"]]
    print(f"\n{len(rows)} compilations, {len(bad)} with problems, {time.time() - t0:.0f} s; "
          f"wrote {args.out}/table.md and results.json")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
