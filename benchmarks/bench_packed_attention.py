#!/usr/bin/env python
"""One decode step's attention, one layer: vLLM's stock CPU kernel over a bf16
(or, with ``--dtype float32``, float32) paged cache vs the packed-attention C++ kernel over the same tokens held
mostly in packed forms.

Every request has ``N`` cached tokens (this step's token included) and one
query.  The stock side is what ``CPUAttentionBackendImpl.forward`` runs:
``ops.cpu_attention_with_kv_cache`` with the scheduler metadata
``CPUAttentionMetadataBuilder.build`` makes (``ops.cpu_attn_get_scheduler_
metadata``), the ISA of ``_get_attn_isa``, the cache written with
``ops.cpu_attn_reshape_and_cache``.  The packed side holds all but the newest
``--plain`` tokens in packed pages (``kernels.quant.pack``) and those in the
cache dtype in the stock layout (written by the same vLLM op), attended by
``kernels.packed_attention.packed_attention_into(..., impl="cpu")`` -- the
call the engine makes per layer (``attention/cpu.py``), writing rows
into the step's output.

Columns: ``stock``, ``packed`` (the Python entry point, as the engine calls
it: argument checks, the op -- which rotates queries and outputs of rotated
forms itself -- writing into the output), ``op`` (the registered C++ op
alone, arguments prepared once), ``engine`` (an estimate of the engine's
per-layer cost for such requests: vLLM's kernel over their query rows only,
which is all the engine still runs for them, ``runner_patch._attend_once``,
plus ``packed``).  Times are the
median of many calls (p10/p90 in the JSON), after warm-up.  Bytes are K/V
bytes a call has to read: plain ``N * Hkv * 2D * element size`` per request; packed: codes and
parameters of the packed tokens (``PagedForm.token_bytes``) plus the
plain tokens.  Scheduler metadata and the ``PackedBatch`` are built once per
step in the engine and are not timed.

Correctness, once per case: the packed kernel's rows of the first (up to) two
requests against ``kernels.packed_reference.reference``; once per shape, the
stock kernel against plain PyTorch attention over the bf16 cache (checks that
the stock call is driven right).  Requests alternate between two distinct
data sets (so a wrong block table would show), copied block by block.  Each
kernel cycles over copies of its cache (``--working-set-mib``), as a step
does over its layers, so a small cache is not timed hot in the L3.

    python benchmarks/bench_packed_attention.py            # full
    python benchmarks/bench_packed_attention.py --quick    # < 1 minute
    python benchmarks/bench_packed_attention.py --shapes smollm2 --batches 1,8 --ns 1024,4096
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # the embedded default model, SmolLM2-135M; vLLM's CPU block size 32
    "smollm2": dict(label="SmolLM2-135M (Hq=9, Hkv=3, D=64, bs=32)", hq=9, hkv=3, d=64,
                    bs=32, layers=30),
    # an 8B-class GQA model (Llama-3-8B's heads), block size 128
    "8b": dict(label="8B-class (Hq=32, Hkv=8, D=128, bs=128)", hq=32, hkv=8, d=128,
               bs=128, layers=32),
}
MIX = "mix"
MIX_PARTS = (("int8_tok", 0.10), ("int4_tok_rot", 0.40), ("int2_tok_rot", 0.50))
FORMS = ("int8_tok", "int4_tok_rot", "int2_tok_rot", MIX)


def form_label(name: str) -> str:
    if name == MIX:
        return "mix " + "/".join(f"{round(100 * f)}% {n}" for n, f in MIX_PARTS)
    return name


def form_parts(name: str) -> tuple[tuple[str, float], ...]:
    return MIX_PARTS if name == MIX else ((name, 1.0),)


# ------------------------------------------------------------------ timing
def measure(fns: dict, target_s: float, min_reps: int, max_reps: int, rounds: int = 3
            ) -> dict:
    """Time each closure of ``fns`` after warming it up: per closure about
    ``target_s`` of calls (at least ``min_reps``), in ``rounds`` interleaved
    rounds (every closure takes its share of a round in turn, so a burst of
    load from another process hits all of them alike).  Returns per name
    median / p10 / p90 in microseconds and the number of calls."""
    reps, samples = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        warm = 0
        while warm < 3 or (warm < 20 and time.perf_counter() - t0 < 0.02):
            fn()
            warm += 1
        per = (time.perf_counter() - t0) / warm
        reps[name] = int(max(min_reps, min(max_reps, target_s / max(per, 1e-7))))
        samples[name] = []
    for k in range(rounds):
        for name, fn in fns.items():
            n = reps[name] // rounds + (1 if k < reps[name] % rounds else 0)
            fn()  # back from the other closures: one untimed call
            ts = samples[name]
            for _ in range(n):
                a = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - a)
    out = {}
    for name, ts in samples.items():
        ts.sort()
        q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]  # noqa: E731
        out[name] = dict(median_us=statistics.median(ts) * 1e6, p10_us=q(0.10) * 1e6,
                         p90_us=q(0.90) * 1e6, reps=len(ts))
    return out


# ------------------------------------------------------------------- stock
class Stock:
    """vLLM's CPU attention as ``CPUAttentionBackendImpl.forward`` drives it."""

    def __init__(self, shape: dict, dtype):
        import torch
        from vllm import envs
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.s = shape
        self.dtype = dtype
        self.isa = _get_attn_isa(dtype, shape["bs"], shape["d"], "auto")
        self.split_kv = bool(envs.VLLM_CPU_ATTN_SPLIT_KV)
        self.torch = torch

    def views(self, cache):
        nb, h, bs, _ = cache.shape
        return cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)

    def write(self, cache, k, v, slots):
        """``k``/``v`` ``[T, Hkv, D]`` into ``slots`` (vLLM's cache-write op)."""
        from vllm import _custom_ops as ops

        kc, vc = self.views(cache)
        ops.cpu_attn_reshape_and_cache(k.to(self.dtype).contiguous(),
                                       v.to(self.dtype).contiguous(), kc, vc,
                                       slots.to(self.torch.int64), self.isa, k_scale=1.0,
                                       v_scale=1.0, kv_cache_dtype="auto")

    def call(self, q, caches, block_table, seq_lens):
        """A closure running one call (metadata built once, as per step),
        each call on the next of ``caches`` (copies: successive layers)."""
        from vllm import _custom_ops as ops

        torch = self.torch
        b = q.shape[0]
        qsl = torch.arange(b + 1, dtype=torch.int32)
        seq = torch.as_tensor(seq_lens, dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=b, num_heads=self.s["hq"], num_kv_heads=self.s["hkv"],
            head_dim=self.s["d"], seq_lens=seq, dtype=self.dtype, query_start_loc=qsl,
            causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=self.split_kv, dynamic_causal=None, kv_cache_dtype="auto")
        views = [self.views(c) for c in caches]
        out = torch.empty_like(q)
        scale = self.s["d"] ** -0.5
        i = [0]

        def run():
            kc, vc = views[i[0]]
            i[0] = (i[0] + 1) % len(views)
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                seq_lens=seq, scale=scale, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=block_table, softcap=0,
                scheduler_metadata=meta, s_aux=None, dynamic_causal=None, k_scale=1.0,
                v_scale=1.0, kv_cache_dtype="auto")
            return out

        return run


def torch_attention(q, k, v, scale):
    """Plain attention of one decode query ``[Hq, D]`` over ``k``/``v``
    ``[Hkv, N, D]`` (every token visible): ``[Hq, D]`` float32."""
    import torch

    hq, d = q.shape
    hkv = k.shape[0]
    qq = q.float().view(hkv, hq // hkv, d)
    p = torch.softmax(torch.einsum("hgd,hnd->hgn", qq, k.float()) * scale, dim=-1)
    return torch.einsum("hgn,hnd->hgd", p, v.float()).reshape(hq, d)


# -------------------------------------------------------------------- case
def make_data(shape: dict, n: int, sets: int, seed: int):
    """``sets`` distinct requests' K/V ``[Hkv, N, D]`` (bf16 values, float32)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sets):
        k = (torch.randn(shape["hkv"], n, shape["d"], generator=gen) * 1.5 + 0.3)
        v = torch.randn(shape["hkv"], n, shape["d"], generator=gen)
        out.append((k.bfloat16().float(), v.bfloat16().float()))
    return out


def replicate(template, b: int):
    """A cache of ``b`` requests: request ``r`` gets a copy of template
    ``r % len(template)`` (each ``[nbr, Hkv, bs, 2D]``) in blocks
    ``r * nbr ... r * nbr + nbr - 1``."""
    import torch

    nbr = template[0].shape[0]
    cache = torch.empty(b * nbr, *template[0].shape[1:], dtype=template[0].dtype)
    view = cache.view(b, nbr, *template[0].shape[1:])
    for r in range(b):
        view[r].copy_(template[r % len(template)])
    return cache


def stock_cache(stock: Stock, shape: dict, data, b: int):
    """Paged cache (``stock.dtype``) of ``b`` requests of ``N`` tokens; block table."""
    import torch

    n = data[0][0].shape[1]
    bs = shape["bs"]
    nbr = -(-n // bs)
    templates = []
    for k, v in data:
        t = torch.zeros(nbr, shape["hkv"], bs, 2 * shape["d"], dtype=stock.dtype)
        stock.write(t, k.transpose(0, 1), v.transpose(0, 1), torch.arange(n))
        templates.append(t)
    cache = replicate(templates, b)
    table = (torch.arange(b, dtype=torch.int32)[:, None] * nbr +
             torch.arange(nbr, dtype=torch.int32)[None])
    return cache, table


def packed_cache(stock: Stock, shape: dict, data, b: int, form: str, plain: int):
    """The same tokens, all but the newest ``plain`` packed in ``form`` (a
    mix: contiguous runs per part), the rest plain (``stock.dtype``) in the stock layout.
    Returns ``(cache, PackedBatch, bytes per request)``."""
    import torch

    from vllm_kvshrink.kernels.packed_batch import PackedBatch
    from vllm_kvshrink.kernels.quant import pack, region_view
    from vllm_kvshrink.storage.paged import paged_form

    hkv, d, bs = shape["hkv"], shape["d"], shape["bs"]
    n = data[0][0].shape[1]
    npk = n - plain
    parts = form_parts(form)
    elem = torch.empty(0, dtype=stock.dtype).element_size()
    forms = [paged_form(name, d, bs, elem) for name, _ in parts]
    counts = [int(round(f * npk)) for _, f in parts]
    counts[-1] = npk - sum(counts[:-1])
    pages = [-(-c // pf.capacity) for c, pf in zip(counts, forms)]
    nplain = -(-plain // bs)
    nbr = sum(pages) + nplain
    templates = []
    segs = []
    for k, v in data:
        t = torch.zeros(nbr, hkv, bs, 2 * d, dtype=stock.dtype)
        regions = region_view(t)
        blk, t0, segs = 0, 0, []
        for fi, (pf, c) in enumerate(zip(forms, counts)):
            if c == 0:
                continue
            pg = pack(pf, k[:, t0: t0 + c], v[:, t0: t0 + c])  # [Hkv, P, region]
            for p in range(pg.shape[1]):
                regions[blk] = pg[:, p]
                segs.append((blk, fi, min(pf.capacity, c - p * pf.capacity)))
                blk += 1
            t0 += c
        stock.write(t[blk:], k[:, npk:].transpose(0, 1), v[:, npk:].transpose(0, 1),
                    torch.arange(plain))
        templates.append(t)
    plain_blocks = list(range(sum(pages), nbr))
    cache = replicate(templates, b)
    reqs = [dict(q_start=r, q_len=1, plain_len=plain,
                 plain_blocks=[r * nbr + x for x in plain_blocks],
                 segments=[(r * nbr + blk, fi, c) for blk, fi, c in segs])
            for r in range(b)]
    batch = PackedBatch.build(reqs, forms)
    per_req = hkv * (sum(c * pf.token_bytes for c, pf in zip(counts, forms)) + plain * 2 * elem * d)
    return cache, batch, per_req


def sub_batch(batch, r: int):
    """The first ``r`` requests of ``batch``."""
    from vllm_kvshrink.kernels.packed_batch import PackedBatch

    s = int(batch.seg_start[r])
    return PackedBatch(q_start=batch.q_start[:r], q_len=batch.q_len[:r],
                       plain_len=batch.plain_len[:r], plain_table=batch.plain_table[:r],
                       seg_start=batch.seg_start[: r + 1], seg_block=batch.seg_block[:s],
                       seg_form=batch.seg_form[:s], seg_n=batch.seg_n[:s],
                       forms=batch.forms)


def cycle(fns):
    """A closure calling the next of ``fns`` each time."""
    i = [0]

    def run():
        f = fns[i[0]]
        i[0] = (i[0] + 1) % len(fns)
        return f()

    return run


def copies(cache, working_set: float, most: int):
    """``cache`` and clones of it, enough that together they exceed
    ``working_set`` bytes (at most ``most``): calls cycle over them like a
    step over its layers, so a small cache is not timed hot in the CPU
    caches."""
    k = int(max(1, min(most, -(-working_set // (cache.numel() * cache.element_size())))))
    return [cache] + [cache.clone() for _ in range(k - 1)]


def raw_op(q, cache, batch, scale):
    """The registered C++ op alone, with its arguments prepared once, writing
    into a bf16 output at the queries' rows: what is left of ``packed``
    without Python."""
    import torch

    from vllm_kvshrink.kernels.packed_batch import LAYOUT_CODES

    i64 = lambda t: t.to(torch.int64).contiguous()  # noqa: E731
    qc = q.contiguous()
    out = torch.empty_like(qc)
    no_map = torch.zeros(0, dtype=torch.int32)
    args = (out, qc, cache, LAYOUT_CODES["cpu_k_transposed"], no_map, no_map,
            i64(batch.q_start), i64(batch.q_len), i64(batch.plain_len),
            batch.plain_table.to(torch.int32).contiguous(), i64(batch.seg_start),
            i64(batch.seg_block), i64(batch.seg_form), i64(batch.seg_n),
            batch.form_table().contiguous(), i64(batch.q_start), float(scale))
    op = torch.ops.kvshrink_cpu.packed_attention
    return lambda: op(*args)


# -------------------------------------------------------------------- main
def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small cases (< 1 minute)")
    ap.add_argument("--shapes", default="smollm2,8b", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ns", default="1024,4096,16384", help="tokens per request")
    ap.add_argument("--forms", default=",".join(FORMS),
                    help=f"packed forms (token-axis) and/or {MIX!r}: "
                         f"{form_label(MIX)}".replace("%", "%%"))
    ap.add_argument("--plain", type=int, default=64, help="newest tokens kept plain")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="the cache's and the queries' dtype (the model dtype a server runs: "
                         "float32 where the CPU has no native bf16, see bench_gemm_dtype.py)")
    ap.add_argument("--max-cache-mib", type=float, default=1024,
                    help="skip cases whose plain cache is larger (MiB, one layer)")
    ap.add_argument("--target-s", type=float, default=0.25,
                    help="time spent timing each kernel per case (s)")
    ap.add_argument("--min-reps", type=int, default=7)
    ap.add_argument("--max-reps", type=int, default=2000)
    ap.add_argument("--working-set-mib", type=float, default=96,
                    help="cycle each kernel over copies of its cache (like layers, at most "
                         "the model's layer count) until they exceed this, so small caches "
                         "are not timed hot in the CPU caches (L3 here: see lscpu); 0: one copy")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds over the kernels of a case")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (default: the machine's cores)")
    ap.add_argument("--json",
                    default=str(REPO / "docs" / "results" / "bench_packed_attention.json"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.batches, args.ns = "smollm2,8b", "1,8", "1024,4096"
        args.target_s, args.min_reps = 0.1, 5
        args.max_cache_mib = min(args.max_cache_mib, 64)

    import torch

    dtype = getattr(torch, args.dtype)
    elem = torch.empty(0, dtype=dtype).element_size()
    from vllm_kvshrink.kernels import cpu_ext
    from vllm_kvshrink.kernels.packed_attention import packed_attention, packed_attention_into
    from vllm_kvshrink.kernels.packed_reference import reference
    from vllm_kvshrink.storage.paged import paged_form

    torch.set_num_threads(args.threads)
    if not cpu_ext.load():
        print(f"the packed C++ kernel is not available: {cpu_ext.unavailable_reason()}",
              file=sys.stderr)
        return 1
    import vllm

    shapes = [s for s in args.shapes.split(",") if s]
    forms = [f for f in args.forms.split(",") if f]
    batches, ns = parse_ints(args.batches), parse_ints(args.ns)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    meta = dict(command=" ".join(["python", "benchmarks/bench_packed_attention.py"] +
                                 sys.argv[1:]),
                cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                torch=torch.__version__, vllm=vllm.__version__,
                load_avg_start=os.getloadavg(), plain_tokens=args.plain, dtype=args.dtype,
                target_s=args.target_s, min_reps=args.min_reps, rounds=args.rounds,
                working_set_mib=args.working_set_mib, kernel_flags=cpu_ext.build_flags())
    print("# packed attention vs vLLM CPU attention, one layer, one decode step")
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch threads "
          f"{torch.get_num_threads()} (--threads; default: the core count, "
          f"{os.cpu_count()}; OMP_NUM_THREADS="
          f"{meta['omp_num_threads']}); torch {torch.__version__}, vllm {vllm.__version__}; "
          f"load average at start {meta['load_avg_start'][0]:.2f}")
    print(f"command: {meta['command']}")
    print(f"packed kernel built with: {meta['kernel_flags']}")
    busy = meta["load_avg_start"][0]
    if busy > 0.5 and torch.get_num_threads() > 1:
        print(f"WARNING: the machine is busy (load {busy:.2f}) and {torch.get_num_threads()} "
              f"threads run each kernel: an OpenMP region then waits for a descheduled "
              f"thread (a scheduler slice, ~4 ms here), so times go up in steps of ~4 ms; "
              f"--threads 1 measures the kernels rather than the scheduler")
    print(f"timing: median of >= {args.min_reps} calls (~{args.target_s} s per kernel per "
          f"case, {args.rounds} interleaved rounds) after warm-up; each kernel cycles over "
          f"copies of its cache (like layers, <= the layer count) until they exceed "
          f"{args.working_set_mib:.0f} MiB, so nothing is timed hot in the L3")
    cases = []
    checks = []
    t_start = time.perf_counter()
    for sname in shapes:
        shape = SHAPES[sname]
        stock = Stock(shape, dtype)
        meta.setdefault("isa", {})[sname] = stock.isa
        meta["split_kv"] = stock.split_kv
        print(f"\n## {shape['label']}: stock ISA {stock.isa!r} (cache layout "
              f"cpu_k_transposed for 'vec'), VLLM_CPU_ATTN_SPLIT_KV={stock.split_kv}")
        for part in dict.fromkeys(p for name in forms for p, _ in form_parts(name)):
            pf = paged_form(part, shape["d"], shape["bs"], elem)
            print(f"   {part}: {pf.capacity} tokens/block (plain: {shape['bs']}), "
                  f"{pf.token_bytes} B/token/head ({args.dtype}: {2 * elem * shape['d']})")
        scale = shape["d"] ** -0.5
        stock_checked = False
        for n in ns:
            data = make_data(shape, n, 2, seed=n + shape["d"])
            for b in batches:
                mib = b * n * shape["hkv"] * 2 * elem * shape["d"] / 2**20
                if mib > args.max_cache_mib:
                    print(f"   skip B={b} N={n}: plain cache {mib:.0f} MiB > "
                          f"--max-cache-mib {args.max_cache_mib:.0f}")
                    continue
                gen = torch.Generator().manual_seed(b * 7 + n)
                q = torch.randn(b, shape["hq"], shape["d"], generator=gen).to(dtype)
                cache, table = stock_cache(stock, shape, data, b)
                ws, most = args.working_set_mib * 2**20, shape["layers"]
                scopies = copies(cache, ws, most)
                ncopies = {"stock": len(scopies)}
                fns = {"stock": stock.call(q, scopies, table, [n] * b)}
                out_stock = fns["stock"]().float().clone()
                if not stock_checked:
                    err = max((out_stock[r] - torch_attention(q[r], *data[r % 2], scale))
                              .abs().max().item() for r in range(min(b, 2)))
                    checks.append(dict(shape=sname, batch=b, n=n, stock_vs_torch=err))
                    print(f"   check: stock kernel vs PyTorch attention over the plain cache "
                          f"(B={b}, N={n}): max|diff| {err:.2e} ({args.dtype} output)")
                    stock_checked = True
                bytes_stock = b * n * shape["hkv"] * 2 * elem * shape["d"]
                layout = "cpu_k_transposed"
                info = {}
                for form in forms:
                    pcache, batch, per_req = packed_cache(stock, shape, data, b, form,
                                                          args.plain)
                    pcopies = copies(pcache, ws, most)
                    ncopies[form] = len(pcopies)
                    out_into = torch.empty_like(q)
                    run_packed = cycle([lambda pc=pc, bt=batch: packed_attention_into(
                        q, pc, layout, bt, scale, out_into, impl="cpu") for pc in pcopies])
                    out_packed = packed_attention(q, pcache, layout, batch, scale, impl="cpu")
                    r2 = min(b, 2)
                    want = reference(q[:r2], pcache, layout, sub_batch(batch, r2), scale)
                    info[form] = dict(
                        err=(out_packed[:r2] - want).abs().max().item(),
                        vs_stock=(out_packed[:r2] - out_stock[:r2]).abs().max().item(),
                        bytes=b * per_req, segments=int(batch.seg_block.numel()))
                    fns[f"packed:{form}"] = run_packed
                    fns[f"op:{form}"] = cycle([raw_op(q, pc, batch, scale) for pc in pcopies])
                    if "stock_plain" not in fns:  # vLLM's kernel over the query rows only
                        fns["stock_plain"] = stock.call(q, pcopies, batch.plain_table, [1] * b)
                load = os.getloadavg()[0]
                t = measure(fns, args.target_s, args.min_reps, args.max_reps, args.rounds)
                del fns, cache, scopies, pcopies
                for form in forms:
                    t_stock, t_packed, t_op = t["stock"], t[f"packed:{form}"], t[f"op:{form}"]
                    t_plain, inf = t["stock_plain"], info[form]
                    row = dict(shape=sname, batch=b, n=n, form=form,
                               form_label=form_label(form), stock=t_stock, packed=t_packed,
                               op=t_op, stock_plain=t_plain,
                               engine_us=t_plain["median_us"] + t_packed["median_us"],
                               ratio=t_packed["median_us"] / t_stock["median_us"],
                               op_ratio=t_op["median_us"] / t_stock["median_us"],
                               bytes_stock=bytes_stock, bytes_packed=inf["bytes"],
                               bytes_ratio=inf["bytes"] / bytes_stock,
                               segments=inf["segments"],
                               max_abs_diff_vs_reference=inf["err"],
                               max_abs_diff_vs_stock=inf["vs_stock"],
                               layers=shape["layers"], load_avg_1m=load,
                               cache_copies=dict(stock=ncopies["stock"],
                                                 packed=ncopies[form]))
                    cases.append(row)
                    print(f"   B={b:>2} N={n:>5} {form:<13} stock {t_stock['median_us']:9.1f} us"
                          f"  packed {t_packed['median_us']:9.1f} us (op "
                          f"{t_op['median_us']:9.1f})  x{row['ratio']:.2f}  bytes "
                          f"x{row['bytes_ratio']:.3f}  |packed-ref| {inf['err']:.1e}  "
                          f"|packed-stock| {inf['vs_stock']:.1e}  load {load:.2f}", flush=True)
    elapsed = time.perf_counter() - t_start
    meta["elapsed_s"] = elapsed
    meta["load_avg_end"] = os.getloadavg()

    # ---------------------------------------------------------------- table
    print("\n## Results (one layer's attention, one decode step, median per call)\n")
    print("| shape | batch | N | form | stock µs (p10–p90) | packed µs (p10–p90) | "
          "ratio packed/stock | bytes ratio | op µs | engine µs |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    span = lambda t: (f"{t['median_us']:.0f} ({t['p10_us']:.0f}–"  # noqa: E731
                      f"{t['p90_us']:.0f})")
    for c in cases:
        print(f"| {c['shape']} | {c['batch']} | {c['n']} | {c['form_label']} | "
              f"{span(c['stock'])} | {span(c['packed'])} | "
              f"{c['ratio']:.2f} | {c['bytes_ratio']:.3f} | {c['op']['median_us']:.0f} | "
              f"{c['engine_us']:.0f} |")
    print("\nop: the C++ op alone, arguments prepared once (no Python wrapper); engine: "
          "vLLM's kernel over each request's query row (all the engine still runs for a "
          "packed request) + packed, medians added.")
    share = []
    for sname in shapes:
        sh = SHAPES[sname]
        share.append(f"{sh['label']} has {sh['layers']} layers: a decode step's attention is "
                     f"about {sh['layers']} x these times; the rest of the step (projections, "
                     f"MLP, sampling, scheduling) is not covered")
    mc = REPO / "docs" / "results" / "method_cost.json"
    step_ms = None
    if mc.is_file():
        try:
            step_ms = float(json.loads(mc.read_text())["decode_step_ms"])
        except (ValueError, KeyError, TypeError):
            step_ms = None
    base = next((c for c in cases if c["shape"] == "smollm2" and c["batch"] == 1
                 and c["n"] == 1024), None)
    if step_ms and base:
        att = base["stock"]["median_us"] * base["layers"] / 1e3
        share.append(f"stock vLLM decode step, SmolLM2-135M, 1 sequence, 1024 tokens: "
                     f"{step_ms:.1f} ms (docs/results/method_cost.json, measured by "
                     f"bench_method_cost.py); its 30 layers of attention here: {att:.2f} ms "
                     f"= {100 * att / step_ms:.0f}% of it")
        meta["decode_step_ms"] = step_ms
        meta["attention_share_b1_n1024"] = att / step_ms
    print("\nCoverage: one layer's attention only.")
    for s in share:
        print(f"- {s}")
    print("\nchecks: stock vs PyTorch: " + ", ".join(
        f"{c['shape']} B={c['batch']} N={c['n']}: {c['stock_vs_torch']:.2e}" for c in checks))
    if cases:
        print(f"checks: packed vs reference, worst over cases: "
              f"{max(c['max_abs_diff_vs_reference'] for c in cases):.2e}")
    print(f"elapsed {elapsed:.0f} s; load average at end {meta['load_avg_end'][0]:.2f}")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, stock_checks=checks, cases=cases), indent=1))
    print(f"wrote {out}")
    if not args.no_plot and cases:
        png = out.with_suffix(".png")
        plot(cases, shapes, batches, forms, png)
        print(f"wrote {png}")
    return 0


def plot(cases, shapes, batches, forms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shapes), len(batches), squeeze=False,
                             figsize=(4.2 * len(batches), 3.4 * len(shapes)), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(shapes):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            for k, f in enumerate(forms):
                rows = sorted((c for c in cases if c["shape"] == s and c["batch"] == b
                               and c["form"] == f), key=lambda c: c["n"])
                if not rows:
                    continue
                x = [c["n"] for c in rows]
                ax.plot(x, [c["ratio"] for c in rows], "o-", color=colors[k % len(colors)],
                        label=form_label(f) if f != MIX else "mix 10/40/50% int8/4r/2r")
                ax.plot(x, [c["bytes_ratio"] for c in rows], ":",
                        color=colors[k % len(colors)])
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{s}, batch {b}", fontsize=9)
            ax.set_xlabel("tokens per request (N)")
            if j == 0:
                ax.set_ylabel("packed / stock time\n(dotted: bytes ratio)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Packed attention vs vLLM CPU attention, one layer, one decode step",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
