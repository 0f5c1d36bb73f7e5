"""The packed-attention kernels (C++: ``kernels.cpu_ext``; Triton, in the CPU
interpreter: ``kernels.triton_packed``) against the dequantize-then-attend
reference (``kernels.packed_reference.reference``), and the entry point that
chooses between them (``kernels.packed_attention``).

Every token-axis form the engine can page, written with ``kernels.quant.pack``
into blocks of a random cache; plain regions in both CPU layouts; odd token
counts, GQA, chunked prefill, mixed forms in one batch and in one request.

Tolerances: outputs are O(1) (softmax averages of O(1) values) and both
sides dequantize to the same fp32 values (bf16 plain values are widened
exactly), so only the order of fp32 sums differs: 1e-4 absolute (2e-4 for
the Triton kernel, whose sums are ordered by ``tl.dot``).

The Triton tests run in Triton's interpreter, switched on for the whole
group (``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.kernels import cpu_ext, triton_packed
from vllm_kvshrink.kernels.packed_attention import packed_attention, packed_attention_into
from vllm_kvshrink.kernels.packed_batch import PackedBatch
from vllm_kvshrink.kernels.packed_reference import reference
from vllm_kvshrink.kernels.quant import pack, region_view
from vllm_kvshrink.storage.paged import paged_form

FORMS = ("int8_tok", "int4_tok", "int2_tok", "k4v2_tok")
ALL_FORMS = FORMS + tuple(f + "_rot" for f in FORMS)
LAYOUTS = ("cpu_k_transposed", "cpu_row_major")
ATOL_CPU = 1e-4
ATOL_TRITON = 2e-4


def make_case(reqs, *, d=64, bs=32, hkv=2, g=2, dtype=torch.float32, seed=0, gap=1):
    """A cache and batch for ``reqs``: dicts ``q_len, plain_len, segs=[(form,
    n), ...]`` (``n`` capped at the form's page capacity).  Blocks are scattered at random; the query rows of the requests
    are separated by ``gap`` unused rows.  Returns ``(q, cache, batch)``."""
    gen = torch.Generator().manual_seed(seed)
    elem = torch.empty(0, dtype=dtype).element_size()
    names = sorted({f for r in reqs for f, _ in r["segs"]})
    forms = [paged_form(n, d, bs, elem) for n in names]
    need = sum(-(-r["plain_len"] // bs) + len(r["segs"]) for r in reqs)
    nb = need + 3
    cache = torch.randn(nb, hkv, bs, 2 * d, generator=gen).to(dtype)
    order = torch.randperm(nb, generator=gen).tolist()
    regions = region_view(cache)
    rows, specs = gap, []
    for r in reqs:
        plain = [order.pop() for _ in range(-(-r["plain_len"] // bs))]
        segs = []
        for name, n in r["segs"]:
            pf = forms[names.index(name)]
            n = min(n, pf.capacity)  # small pages: a full one
            blk = order.pop()
            k = torch.randn(hkv, n, d, generator=gen) * 1.5 + 0.3
            v = torch.randn(hkv, n, d, generator=gen)
            regions[blk] = pack(pf, k, v)[:, 0]
            segs.append((blk, names.index(name), n))
        specs.append(dict(q_start=rows, q_len=r["q_len"], plain_len=r["plain_len"],
                          plain_blocks=plain, segments=segs))
        rows += r["q_len"] + gap
    q = torch.randn(rows, hkv * g, d, generator=gen)
    return q, cache, PackedBatch.build(specs, forms)


def close(got, want, atol):
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def cpu():
    if not cpu_ext.load():
        pytest.fail(f"the C++ kernel did not build: {cpu_ext.unavailable_reason()}")
    return cpu_ext


def run_cpu(q, cache, layout, batch):
    scale = q.shape[-1] ** -0.5
    close(cpu_ext.packed_attention(q, cache, layout, batch, scale),
          reference(q, cache, layout, batch, scale), ATOL_CPU)


# ---------------------------------------------------------------- C++ kernel
def test_builds_here():
    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    assert cpu_ext.available() and cpu_ext.unavailable_reason() is None
    assert hasattr(torch.ops.kvshrink_cpu, "packed_attention")
    # built for this CPU's vector units: a source that fails under
    # -march=native falls back to the portable build, several times slower
    assert "-march=native" in cpu_ext.build_flags()


def test_first_compiler_error_is_named():
    from vllm_kvshrink.kernels import cpu_lib

    log = ("[1/3] c++ -c x.cpp\nIn file included from x.cpp:1:\n"
           "page_format.h:204:40: error: '_mm512_foo' was not declared in this scope\n"
           "page_format.h:205:1: error: expected ';'\nninja: build stopped")
    assert cpu_lib._first_error(log) == (
        "page_format.h:204:40: error: '_mm512_foo' was not declared in this scope")
    assert cpu_lib._first_error("ninja: build stopped") is None


@pytest.mark.parametrize("form", ALL_FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_every_form(cpu, form, layout):
    q, cache, batch = make_case(
        [dict(q_len=1, plain_len=45, segs=[(form, 77)]),
         dict(q_len=1, plain_len=1, segs=[(form, 5), (form, 33)])],
        d=64, bs=32, hkv=2, g=2, seed=ALL_FORMS.index(form))
    run_cpu(q, cache, layout, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs,d", [(16, 64), (32, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_shapes_dtypes(cpu, dtype, bs, d, layout):
    q, cache, batch = make_case(
        [dict(q_len=1, plain_len=bs + 7, segs=[("int4_tok", 61), ("int2_tok_rot", 3)]),
         dict(q_len=1, plain_len=3, segs=[("k4v2_tok", 100)])],
        d=d, bs=bs, hkv=2, g=4, dtype=dtype, seed=bs + d)
    run_cpu(q, cache, layout, batch)


@pytest.mark.parametrize("hkv,g", [(1, 1), (4, 1), (2, 2), (2, 4), (1, 3), (2, 8), (1, 32)])
def test_cpu_gqa(cpu, hkv, g):
    q, cache, batch = make_case(
        [dict(q_len=1, plain_len=19, segs=[("int4_tok_rot", 40), ("int8_tok", 9)]),
         dict(q_len=3, plain_len=70, segs=[("int4_tok", 1)])],
        d=64, bs=16, hkv=hkv, g=g, seed=7 * g + hkv)
    for layout in LAYOUTS:
        run_cpu(q, cache, layout, batch)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunked_prefill(cpu, layout, dtype):
    # q_len spanning several query tiles and blocks, plus a decode request
    q, cache, batch = make_case(
        [dict(q_len=37, plain_len=37, segs=[("int4_tok", 50), ("int8_tok_rot", 31)]),
         dict(q_len=130, plain_len=200, segs=[("k4v2_tok_rot", 77)]),
         dict(q_len=1, plain_len=33, segs=[("int2_tok", 12)]),
         dict(q_len=5, plain_len=5, segs=[])],
        d=128, bs=32, hkv=2, g=4, dtype=dtype, seed=11)
    run_cpu(q, cache, layout, batch)


def test_cpu_many_mixed_requests(cpu):
    gen = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(9):
        segs = [(ALL_FORMS[int(torch.randint(len(ALL_FORMS), (1,), generator=gen))],
                 int(torch.randint(1, 90, (1,), generator=gen))) for _ in range(i % 4)]
        ql = 1 if i % 3 else int(torch.randint(2, 20, (1,), generator=gen))
        reqs.append(dict(q_len=ql, plain_len=ql + int(torch.randint(0, 70, (1,), generator=gen)),
                         segs=segs))
    q, cache, batch = make_case(reqs, d=64, bs=16, hkv=2, g=2, dtype=torch.bfloat16, seed=5)
    for layout in LAYOUTS:
        run_cpu(q, cache, layout, batch)


def test_cpu_full_pages_and_dispatch(cpu):
    pf = paged_form("int2_tok", 64, 32, 4)
    q, cache, batch = make_case(
        [dict(q_len=2, plain_len=64, segs=[("int2_tok", pf.capacity), ("int4_tok_rot", 9)])],
        d=64, bs=32, hkv=1, g=2, seed=2)
    run_cpu(q, cache, "cpu_row_major", batch)
    scale = 0.125
    close(packed_attention(q, cache, "cpu_row_major", batch, scale, impl="auto"),
          reference(q, cache, "cpu_row_major", batch, scale), ATOL_CPU)


def test_cpu_bf16_queries_and_strided_cache(cpu):
    # a layer's slice of a bigger allocation: block stride > region
    q, cache, batch = make_case([dict(q_len=2, plain_len=40, segs=[("int8_tok", 20)])],
                                d=64, bs=16, hkv=2, g=2, seed=9)
    big = torch.zeros(cache.shape[0], 3, *cache.shape[2:])
    big[:, 1:] = cache
    view = big[:, 1:]
    assert not view.is_contiguous()
    want = reference(q.bfloat16(), cache, "cpu_k_transposed", batch, 0.1)
    close(cpu_ext.packed_attention(q.bfloat16(), view, "cpu_k_transposed", batch, 0.1),
          want, ATOL_CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_writes_into_the_step_output(cpu, dtype):
    """The engine's entry: each packed request's rows written into the
    attention output at its own query rows, in the output's dtype, queries
    given in the model dtype (rotated forms rotated inside the kernel); the
    rows of other requests are not touched."""
    q, cache, batch = make_case(
        [dict(q_len=1, plain_len=50, segs=[("int4_tok_rot", 40), ("int2_tok", 30)]),
         dict(q_len=3, plain_len=20, segs=[("int8_tok_rot", 25)])],
        d=64, bs=16, hkv=2, g=2, dtype=dtype, seed=11, gap=2)
    q = q.to(dtype)
    want = reference(q, cache, "cpu_k_transposed", batch, 0.125)
    for impl in ("cpu", "reference"):
        out = torch.full_like(q, 7.0)
        packed_attention_into(q, cache, "cpu_k_transposed", batch, 0.125, out, impl=impl)
        rows = batch.row_index()
        others = torch.ones(q.shape[0], dtype=torch.bool)
        others[rows] = False
        assert bool((out[others] == 7.0).all())
        tol = ATOL_CPU if dtype == torch.float32 else 1e-2
        close(out[rows].float(), want.to(dtype).float(), tol)


def test_cpu_empty_batch(cpu):
    q, cache, _ = make_case([dict(q_len=1, plain_len=1, segs=[])])
    empty = PackedBatch.build([], [])
    assert cpu_ext.packed_attention(q, cache, "cpu_row_major", empty, 1.0).shape == (0, 4, 64)


def test_cpu_argument_errors(cpu):
    q, cache, batch = make_case([dict(q_len=1, plain_len=20, segs=[("int4_tok", 5)])])
    with pytest.raises(ValueError, match="layout"):
        cpu_ext.packed_attention(q, cache, "flash", batch, 1.0)
    with pytest.raises(ValueError, match="cache dtype"):
        qp, cp, bp = make_case([dict(q_len=1, plain_len=20, segs=[])])
        cpu_ext.packed_attention(qp, cp.double(), "cpu_row_major", bp, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        q8, c8, b8 = make_case([dict(q_len=1, plain_len=3, segs=[])], d=8)
        cpu_ext.packed_attention(q8, c8, "cpu_row_major", b8, 1.0)
    bad = PackedBatch(**{**batch.__dict__, "plain_table": batch.plain_table[:, :0]})
    with pytest.raises(ValueError, match="plain_table"):
        cpu_ext.packed_attention(q, cache, "cpu_row_major", bad, 1.0)
    bad = PackedBatch(**{**batch.__dict__, "q_start": batch.q_start + 100})
    with pytest.raises(ValueError, match="q_start"):
        cpu_ext.packed_attention(q, cache, "cpu_row_major", bad, 1.0)
    bad = PackedBatch(**{**batch.__dict__, "seg_form": batch.seg_form + 1})
    with pytest.raises(ValueError, match="seg_form"):
        cpu_ext.packed_attention(q, cache, "cpu_row_major", bad, 1.0)
    bad_table = batch.plain_table.clone()
    bad_table[0, 0] = cache.shape[0]
    bad = PackedBatch(**{**batch.__dict__, "plain_table": bad_table})
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_ext.packed_attention(q, cache, "cpu_row_major", bad, 1.0)


def test_unavailable_reason_when_sources_missing(monkeypatch, tmp_path):
    from vllm_kvshrink.kernels import cpu_lib

    monkeypatch.setattr(cpu_lib, "CSRC", tmp_path)
    with pytest.raises(RuntimeError, match="sources"):
        cpu_ext.build()


# ------------------------------------------------------- Triton (interpreter)
def run_triton(q, cache, layout, batch):
    scale = q.shape[-1] ** -0.5
    close(triton_packed.packed_attention(q, cache, layout, batch, scale),
          reference(q, cache, layout, batch, scale), ATOL_TRITON)


@pytest.mark.parametrize("layout,dtype", [("cpu_k_transposed", torch.float32),
                                          ("cpu_row_major", torch.bfloat16)])
def test_triton_every_form(triton_interpreter, layout, dtype):
    # every form in one batch: one request per form pair, odd counts
    reqs = [dict(q_len=1, plain_len=17 + 5 * i, segs=[(a, 21 + i), (b, 3)])
            for i, (a, b) in enumerate(zip(FORMS, FORMS[1:] + FORMS[:1]))]
    reqs += [dict(q_len=1, plain_len=9, segs=[(f + "_rot", 13), (f, 40)]) for f in FORMS]
    q, cache, batch = make_case(reqs, d=64, bs=16, hkv=2, g=2, dtype=dtype, seed=21)
    run_triton(q, cache, layout, batch)


def test_triton_prefill_gqa(triton_interpreter):
    q, cache, batch = make_case(
        [dict(q_len=19, plain_len=50, segs=[("int4_tok_rot", 33), ("int8_tok", 7)]),
         dict(q_len=1, plain_len=1, segs=[("k4v2_tok", 70)])],
        d=128, bs=32, hkv=1, g=4, dtype=torch.float16, seed=4)
    run_triton(q, cache, "cpu_k_transposed", batch)
    q, cache, batch = make_case([dict(q_len=3, plain_len=130, segs=[("int2_tok", 5)])],
                                d=64, bs=128, hkv=2, g=1, seed=6)
    run_triton(q, cache, "cpu_row_major", batch)


def test_triton_dispatch_and_errors(triton_interpreter):
    q, cache, batch = make_case([dict(q_len=1, plain_len=5, segs=[("int4_tok", 5)])])
    close(packed_attention(q, cache, "cpu_row_major", batch, 0.2, impl="triton"),
          reference(q, cache, "cpu_row_major", batch, 0.2), ATOL_TRITON)
    with pytest.raises(ValueError, match="precision"):
        triton_packed.packed_attention(q, cache, "cpu_row_major", batch, 0.2, precision="x")


def _vllm_write(isa):
    """vLLM's own CPU cache write for ``isa`` (the op its attention backend
    runs), as ``probe_layout`` takes it."""
    from vllm import _custom_ops as ops

    def write(k, v, cache, slots):
        nb, h, bs, _ = cache.shape
        kc, vc = cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k.to(cache.dtype), v.to(cache.dtype), kc, vc, slots,
                                       isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return write


@pytest.mark.parametrize("bs", [32, 64])
def test_cpu_reads_vllm_amx_tiles_through_index_maps(cpu, bs):
    """vLLM's AMX ISA lays a bf16 block out in VNNI tiles (no strided form).
    Probed through vLLM's own cache write (which runs on any CPU with
    AVX-512), its index maps let the kernel read it: the same tokens written
    in the AMX layout and in the 'vec' layout, with the same packed pages,
    attend to the same output, and the reference agrees.  vLLM's library for
    CPUs without AVX-512 is built without the AMX write: skipped there,
    saying so."""
    from vllm_kvshrink.kernels.packed_batch import IndexMap
    from vllm_kvshrink.serving.worker.kv_layout import probe_layout

    d, hkv, g = 64, 2, 3
    try:
        amx = probe_layout(_vllm_write("amx"), hkv, bs, d, torch.bfloat16)
    except RuntimeError as e:
        if "Unsupported CPU attention configuration" not in str(e):
            raise
        pytest.skip(f"vLLM's CPU library here has no AMX cache write ({e})")
    assert amx.kind == "generic"  # not a strided layout
    vec = probe_layout(_vllm_write("vec"), hkv, bs, d, torch.bfloat16)
    assert vec.kind == "k_transposed"
    imap = IndexMap(amx.key_index.reshape(-1).int(), amx.value_index.reshape(-1).int())
    gen = torch.Generator().manual_seed(4)
    plain_len, nb = 3 * bs - 5, 8
    table = [5, 1, 6]
    caches = {}
    for isa in ("vec", "amx"):
        cache = torch.zeros(nb, hkv, bs, 2 * d, dtype=torch.bfloat16)
        g2 = torch.Generator().manual_seed(9)
        k = torch.randn(plain_len, hkv, d, generator=g2)
        v = torch.randn(plain_len, hkv, d, generator=g2)
        slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(plain_len)])
        kc, vc = cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
        from vllm import _custom_ops as ops

        ops.cpu_attn_reshape_and_cache(k.bfloat16(), v.bfloat16(), kc, vc, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        caches[isa] = cache
    segs = []
    for blk, name, n in ((2, "int4_tok_rot", 40), (3, "int2_tok", 50)):
        pf = paged_form(name, d, bs, 2)
        pages = pack(pf, torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d,
                                                                            generator=gen))
        for cache in caches.values():
            region_view(cache)[blk] = pages[:, 0]
        segs.append((blk, name, n))
    forms = [paged_form(n, d, bs, 2) for _, n, _ in segs]
    batch = PackedBatch.build([dict(q_start=1, q_len=2, plain_len=plain_len, plain_blocks=table,
                                    segments=[(b, i, n) for i, (b, _, n) in enumerate(segs)])],
                              forms)
    q = torch.randn(4, hkv * g, d, generator=gen).bfloat16()
    want = reference(q, caches["vec"], "cpu_k_transposed", batch, 0.125)
    close(reference(q, caches["amx"], imap, batch, 0.125), want, ATOL_CPU)
    close(cpu_ext.packed_attention(q, caches["amx"], imap, batch, 0.125), want, ATOL_CPU)
    close(cpu_ext.packed_attention(q, caches["vec"], "cpu_k_transposed", batch, 0.125), want,
          ATOL_CPU)
    with pytest.raises(ValueError, match="index"):
        bad = IndexMap(imap.key_index[:-1], imap.value_index)
        cpu_ext.packed_attention(q, caches["amx"], bad, batch, 0.125)
