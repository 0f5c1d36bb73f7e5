"""Every kernel vs its PyTorch reference: correctness check and timing.

    python benchmarks/kernels/run_all.py --out results/kernels_h100   # GPU, < 5 min
    python benchmarks/kernels/run_all.py --smoke --out /tmp/kern      # CPU, interpreter

Shapes are Llama-3-8B's (32 layers, 8 KV heads / 32 query heads, head dim 128,
vLLM block size 16, fp16): a 4096-token request keeping 25% for compaction,
the request's K or V of all layers for quantization.  Each row reports the
median time, the bytes the op must move divided by it (GB/s), and that as a
fraction of this device's copy bandwidth (a large ``Tensor.copy_``, read +
write, measured in the same run).  Target on an H100: compaction and
quantization >= 0.70.  The reference runs in the same process, so the
``x ref`` column is a like-for-like speed-up.

Needs torch and triton (and matplotlib for the chart); not vLLM: the
``vllm_kvshrink`` package imports vLLM only inside ``register()``.  Writes
``results.json``, ``table.md`` and ``fraction_of_copy.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, table.md, png")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes in Triton's CPU interpreter (checks the script, not speed)")
    p.add_argument("--tokens", type=int, default=4096, help="request length (default 4096)")
    p.add_argument("--keep", type=float, default=0.25, help="kept fraction (default 0.25)")
    p.add_argument("--no-cuda-ext", action="store_true", help="skip building csrc/ with nvcc")
    p.add_argument("--reps", type=int, default=25, help="timed samples per row (median)")
    args = p.parse_args()
    if not 0 < args.keep <= 1:
        p.error(f"--keep={args.keep} must be in (0, 1]")
    if args.tokens < 64:
        p.error(f"--tokens={args.tokens} must be >= 64")
    return args


ARGS = parse_args()
if ARGS.smoke:
    # Triton decides between compiling and interpreting when it is imported.
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

from vllm_kvshrink.kernels import quant  # noqa: E402
from vllm_kvshrink.kernels import reference as quant_ref  # noqa: E402
from vllm_kvshrink.lab.kernels import ops as lab  # noqa: E402
from vllm_kvshrink.lab.kernels import reference as ref  # noqa: E402

from shapes import LLAMA3_8B, SMOKE  # noqa: E402

if ARGS.smoke:
    DEV = torch.device("cpu")
    CFG = dict(SMOKE)
elif torch.cuda.is_available():
    DEV = torch.device("cuda")
    CFG = dict(LLAMA3_8B, tokens=ARGS.tokens, keep=ARGS.keep, merge_tokens=ARGS.tokens)
else:
    sys.exit("no CUDA device: run with --smoke on a CPU machine")
DTYPE = torch.float16


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------
def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, reps: int = ARGS.reps) -> float:
    """Median seconds per call; each sample runs ``fn`` enough times back to
    back (>= ~1 ms on a GPU) that launch overhead overlaps device work."""
    if ARGS.smoke:
        fn()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    for _ in range(3):
        fn()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, min(200, int(1.0 / max(start.elapsed_time(end), 1e-3))))
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    n = (1 << 20) if ARGS.smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * n / median_seconds(lambda: dst.copy_(src), reps=10)


ROWS: list[dict] = []


def record(op, variant, shape, fn, nbytes, check, ok, ref_fn=None, target=None):
    t = median_seconds(fn)
    t_ref = median_seconds(ref_fn) if ref_fn is not None else None
    row = dict(op=op, variant=variant, shape=shape, median_us=t * 1e6,
               gbps=nbytes / t / 1e9, bytes=nbytes, check=check, ok=bool(ok),
               ref_us=None if t_ref is None else t_ref * 1e6, target=target)
    ROWS.append(row)
    print(f"  {op:<11} {variant:<26} {t * 1e6:10.1f} us  {row['gbps']:8.1f} GB/s  {check}",
          flush=True)


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# --------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------
def bench_compaction(cuda_ext) -> None:
    c = CFG
    L, H, D, bs, n = c["layers"], c["kv_heads"], c["head_dim"], c["block"], c["tokens"]
    k_keep = max(1, int(n * c["keep"]))
    n_req = triton.cdiv(n, bs)
    n_blocks = 2 * n_req
    g = torch.Generator(device="cpu").manual_seed(0)
    cache = torch.randn(L, n_blocks, 2, bs, H, D, generator=g).to(DTYPE).to(DEV)
    src_table = torch.randperm(n_blocks, generator=g)[:n_req].to(torch.int32)
    idx = torch.stack([torch.randperm(n, generator=g)[:k_keep].sort().values
                       for _ in range(L * H)]).view(L, H, k_keep).to(torch.int32)
    src_table, idx = src_table.to(DEV), idx.to(DEV)
    dst_table = src_table[: triton.cdiv(k_keep, bs)].clone()  # in place
    moved = 2 * (L * H * k_keep * 2 * D * cache.element_size())  # K+V, read + write
    shape = f"L{L} H{H} D{D} bs{bs} {n}->{k_keep} tok"
    expected = cache.clone()
    ref.compact_kv_ref(expected, "flash", src_table, idx, dst_table)
    work = cache.clone()

    def ref_fn():
        ref.compact_kv_ref(work, "flash", src_table, idx, dst_table)

    variants = [("triton in-place", lambda c_: lab.compact_kv(c_, src_table, idx, dst_table, "flash")),
                ("triton staged", lambda c_: lab.compact_kv(c_, src_table, idx, dst_table, "flash",
                                                          staged=True))]
    if cuda_ext is not None:
        variants += [
            ("cuda in-place", lambda c_: cuda_ext.compact_kv(c_, src_table, idx, dst_table, "flash")),
            ("cuda staged", lambda c_: cuda_ext.compact_kv(c_, src_table, idx, dst_table, "flash",
                                                           staged=True)),
        ]
    for name, fn in variants:
        got = cache.clone()
        fn(got)
        ok = torch.equal(got, expected)
        # staged moves every byte twice (gather, then scatter): no target
        record("compaction", name, shape, lambda: fn(work), moved,
               "exact" if ok else "MISMATCH", ok, ref_fn if name == "triton in-place" else None,
               target=None if "staged" in name else 0.7)
    del cache, expected


def bench_quantization(cuda_ext) -> None:
    c = CFG
    L, H, D, n, gs = c["layers"], c["kv_heads"], c["head_dim"], c["tokens"], c["group"]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(L * H, n, D, generator=g) * 2).to(DTYPE).to(DEV)
    impls = [("triton", quant.quantize, quant.dequantize)]
    if cuda_ext is not None:
        impls.append(("cuda", cuda_ext.quantize, cuda_ext.dequantize))
    for bits in (8, 4, 2):
        for axis in ("token", "channel"):
            x3 = x.transpose(1, 2) if axis == "channel" else x
            exp = quant_ref.quantize_ref(x3, bits, gs, DTYPE)
            exp_x = quant_ref.dequantize_ref(*exp, bits, gs, DTYPE)
            exp_x = exp_x.transpose(1, 2) if axis == "channel" else exp_x
            shape = f"[{L * H},{n},{D}] g{gs} {axis}"
            for name, qfn, dqfn in impls:
                q = qfn(x, bits, gs, axis=axis)
                ok = all(torch.equal(a, b) for a, b in zip(q, exp))
                record("quantize", f"{name} int{bits} {axis}", shape,
                       lambda: qfn(x, bits, gs, axis=axis), nbytes(x, *q),
                       "bit-exact" if ok else "MISMATCH", ok,
                       (lambda: quant_ref.quantize_ref(x3, bits, gs, DTYPE)) if name == "triton" else None,
                       target=0.7)
                out = dqfn(q, bits, gs, axis=axis, dtype=DTYPE)
                err = (out.float() - exp_x.float()).abs().max().item()
                ok = err <= 1e-3 * max(1.0, exp_x.float().abs().max().item())
                check = "bit-exact" if torch.equal(out, exp_x) else f"max err {err:.1e}"
                record("dequantize", f"{name} int{bits} {axis}", shape,
                       lambda: dqfn(q, bits, gs, axis=axis, dtype=DTYPE), nbytes(out, *q),
                       check, ok,
                       (lambda: quant_ref.dequantize_ref(*q, bits, gs, DTYPE)) if name == "triton" else None)
    del exp, exp_x


def bench_merge() -> None:
    c = CFG
    H, D, n = c["kv_heads"], c["head_dim"], c["merge_tokens"]
    groups = max(1, int(n * c["keep"]))
    g = torch.Generator(device="cpu").manual_seed(2)
    keys = torch.randn(H, n, D, generator=g).to(DTYPE).to(DEV)
    values = torch.randn(H, n, D, generator=g).to(DTYPE).to(DEV)
    w = torch.rand(H, n, generator=g).to(DEV)
    grp = torch.randint(0, groups, (H, n), generator=g).to(DEV)
    out = lab.merge_kv(keys, values, w, grp, groups)
    exp = ref.merge_kv_ref(keys, values, w, grp, groups)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, exp))
    record("merge", "triton (one layer)", f"[{H},{n},{D}] -> {groups} groups",
           lambda: lab.merge_kv(keys, values, w, grp, groups), nbytes(keys, values, w, grp, *out),
           f"max err {err:.1e}", err < 2e-2,
           lambda: ref.merge_kv_ref(keys, values, w, grp, groups))


def bench_scoring() -> None:
    c = CFG
    hq, hkv, D, bs, n, wlen = (c["q_heads"], c["kv_heads"], c["head_dim"], c["block"],
                              c["tokens"], c["window"])
    n_blocks = triton.cdiv(n, bs) + 4
    g = torch.Generator(device="cpu").manual_seed(3)
    cache = torch.randn(n_blocks, 2, bs, hkv, D, generator=g).to(DTYPE).to(DEV)
    table = torch.randperm(n_blocks, generator=g)[: triton.cdiv(n, bs)].to(torch.int32).to(DEV)
    q = torch.randn(wlen, hq, D, generator=g).to(DTYPE).to(DEV)
    for red, pool in (("sum", 1), ("max", 1), ("sum", 7)):
        out = lab.window_scores(q, cache, table, n, "flash", reduce=red, pool=pool)

        def reference(red=red, pool=pool):
            s = ref.window_scores_ref(q, cache, "flash", table, n, D**-0.5, red)
            return s if pool == 1 else ref.pool_scores_ref(s, pool, "avg")

        exp = reference()
        err = (out - exp).abs().max().item()
        keys_bytes = n * hkv * D * cache.element_size()
        record("scoring", f"triton {red}, gqa mean" + (f", pool {pool}" if pool > 1 else ""),
               f"W{wlen} Hq{hq} Hkv{hkv} N{n}",
               lambda red=red, pool=pool: lab.window_scores(q, cache, table, n, "flash",
                                                          reduce=red, pool=pool),
               keys_bytes + nbytes(q, out), f"max err {err:.1e}",
               err < 5e-3 * max(1.0, exp.abs().max().item()), reference)


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def device_name() -> str:
    if DEV.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU (Triton interpreter)"


def table(copy_bps: float) -> str:
    lines = [
        f"Device: {device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
        f"copy bandwidth {copy_bps / 1e9:.1f} GB/s (read + write).",
        "",
        "| op | variant | shape | median us | GB/s | x copy BW | target | x ref | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        frac = r["gbps"] * 1e9 / copy_bps
        r["fraction_of_copy"] = frac
        target = ""
        if r["target"] and not ARGS.smoke:  # interpreter timings say nothing about speed
            target = f">= {r['target']:.2f} {'ok' if frac >= r['target'] else 'MISS'}"
        speed = f"{r['ref_us'] / r['median_us']:.1f}x" if r["ref_us"] else ""
        lines.append(f"| {r['op']} | {r['variant']} | {r['shape']} | {r['median_us']:.1f} | "
                     f"{r['gbps']:.1f} | {frac:.2f} | {target} | {speed} | "
                     f"{r['check']}{'' if r['ok'] else ' FAIL'} |")
    return "\n".join(lines)


def chart(path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['op']}: {r['variant']}" for r in ROWS]
    fracs = [r["fraction_of_copy"] for r in ROWS]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(ROWS) + 1.5))
    colors = ["tab:green" if r["ok"] else "tab:red" for r in ROWS]
    ax.barh(range(len(ROWS)), fracs, color=colors)
    ax.axvline(0.7, color="k", linestyle="--", linewidth=1, label="target 0.70")
    ax.set_yticks(range(len(ROWS)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of measured copy bandwidth")
    ax.set_title(device_name(), fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    t0 = time.time()
    ARGS.out.mkdir(parents=True, exist_ok=True)
    cuda_ext, ext_note = None, "not built (--no-cuda-ext or no CUDA)"
    if DEV.type == "cuda" and not ARGS.no_cuda_ext:
        from vllm_kvshrink.lab.kernels import cuda_ext as ext

        try:
            t = time.time()
            if ext.load():
                cuda_ext, ext_note = ext, f"built in {time.time() - t:.0f} s"
        except Exception as e:  # no nvcc on the machine, compiler error: report, go on
            ext_note = f"build failed: {type(e).__name__}: {str(e)[-300:]}"
    print(f"device: {device_name()}  cuda extension: {ext_note}", flush=True)
    copy_bps = copy_bandwidth()
    print(f"copy bandwidth: {copy_bps / 1e9:.1f} GB/s", flush=True)
    bench_compaction(cuda_ext)
    bench_quantization(cuda_ext)
    bench_merge()
    bench_scoring()
    md = table(copy_bps)
    print("\n" + md)
    (ARGS.out / "table.md").write_text(md + "\n")
    result = dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                  smoke=ARGS.smoke, config=CFG, copy_gbps=copy_bps / 1e9,
                  cuda_extension=ext_note, seconds=time.time() - t0, rows=ROWS)
    (ARGS.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    png = chart(ARGS.out / "fraction_of_copy.png")
    print(f"\nwrote {ARGS.out}/results.json, table.md{', fraction_of_copy.png' if png else ''} "
          f"in {time.time() - t0:.0f} s")
    failed = [r for r in ROWS if not r["ok"]]
    for r in failed:
        print(f"CHECK FAILED: {r['op']} {r['variant']}: {r['check']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
