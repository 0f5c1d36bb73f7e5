"""The lab kernels (``lab.kernels.ops``: compaction, merging, window scoring,
KIVI; not called by the engine): Triton kernels vs their PyTorch references,
in Triton's CPU interpreter.

The interpreter is switched on for the whole group (``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.kernels.layouts import kv_views
from vllm_kvshrink.kernels.quant import dequantize, quantize
from vllm_kvshrink.lab.kernels import reference as ref
from vllm_kvshrink.lab.kernels.ops import (
    compact_kv,
    kivi_quantize,
    merge_kv,
    pool_scores,
    window_scores,
)


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _cache(layout, n_layers, n_blocks, bs, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = ((n_layers, n_blocks, 2, bs, heads, d) if layout == "flash"
             else (n_layers, n_blocks, heads, bs, 2 * d))
    if dtype == torch.uint8:  # fp8 storage
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.randn(shape, generator=g).to(dtype)


def _kept(n_layers, heads, n_tokens, n_keep, seed=0):
    """Sorted kept positions, different per (layer, head): [L, H, K] int32."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n_tokens, generator=g)[:n_keep].sort().values
            for _ in range(n_layers * heads)]
    return torch.stack(rows).view(n_layers, heads, n_keep).to(torch.int32)


# ==========================================================================
# compaction
# ==========================================================================
COMPACT_CASES = [
    # layout, block size, dtype, layers, kv heads, head dim, tokens, kept
    ("flash", 1, torch.float16, 2, 3, 8, 7, 3),
    ("flash", 16, torch.bfloat16, 3, 2, 16, 37, 11),
    ("flash", 128, torch.float32, 2, 1, 8, 130, 65),
    ("cpu_k_transposed", 32, torch.bfloat16, 2, 2, 8, 70, 33),
    ("cpu_k_transposed", 128, torch.float32, 1, 2, 4, 129, 127),
    ("cpu_row_major", 16, torch.float16, 2, 3, 12, 33, 17),
    ("flash", 16, torch.uint8, 2, 2, 8, 40, 13),  # fp8 cache, raw bytes
]


@pytest.mark.parametrize("layout,bs,dtype,n_layers,heads,d,n_tokens,n_keep", COMPACT_CASES)
@pytest.mark.parametrize("staged", [False, True])
def test_compact_in_place_matches_reference(layout, bs, dtype, n_layers, heads, d,
                                            n_tokens, n_keep, staged):
    n_src = -(-n_tokens // bs)
    n_blocks = n_src + 3
    cache = _cache(layout, n_layers, n_blocks, bs, heads, d, dtype)
    src_table = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(1))[:n_src]
    src_table = src_table.to(torch.int32)
    dst_table = src_table[: -(-n_keep // bs)].clone()  # compaction in place
    idx = _kept(n_layers, heads, n_tokens, n_keep)
    expected = cache.clone()
    ref.compact_kv_ref(expected, layout, src_table, idx, dst_table)
    compact_kv(cache, src_table, idx, dst_table, layout, staged=staged)
    assert torch.equal(_raw(cache), _raw(expected))
    # and the kept tokens really are at the front, head by head
    k, _ = kv_views(cache, layout)
    k0, _ = kv_views(_cache(layout, n_layers, n_blocks, bs, heads, d, dtype), layout)
    l, h, i = n_layers - 1, heads - 1, n_keep - 1
    s = int(idx[l, h, i])
    moved = k[l, dst_table[i // bs], h, i % bs]
    assert torch.equal(_raw(moved), _raw(k0[l, src_table[s // bs], h, s % bs]))


def test_compact_staged_handles_any_overlap():
    """Destination blocks are the source blocks reversed and sources are not
    sorted: only a gather-then-scatter is correct here."""
    layout, bs, n_layers, heads, d = "flash", 4, 2, 2, 8
    cache = _cache(layout, n_layers, 8, bs, heads, d, torch.float16)
    src_table = torch.tensor([5, 2, 7, 0], dtype=torch.int64)
    dst_table = src_table.flip(0)[:3].clone()
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(16, generator=g)[:11] for _ in range(n_layers * heads)])
    idx = idx.view(n_layers, heads, 11)
    expected = cache.clone()
    ref.compact_kv_ref(expected, layout, src_table, idx, dst_table)
    compact_kv(cache, src_table, idx, dst_table, layout, staged=True)
    assert torch.equal(cache, expected)


def test_compact_empty_and_full_selection():
    layout, bs, n_layers, heads, d = "cpu_k_transposed", 32, 2, 2, 8
    cache = _cache(layout, n_layers, 4, bs, heads, d, torch.float16)
    before = cache.clone()
    table = torch.tensor([2, 0], dtype=torch.int32)
    empty = torch.zeros(n_layers, heads, 0, dtype=torch.int32)
    compact_kv(cache, table, empty, table[:0], layout)
    assert torch.equal(cache, before)
    full = torch.arange(2 * bs, dtype=torch.int32).expand(n_layers, heads, -1).contiguous()
    compact_kv(cache, table, full, table, layout)  # every token onto itself
    assert torch.equal(cache, before)
    other = torch.tensor([3, 1], dtype=torch.int32)
    compact_kv(cache, table, full, other, layout)  # every token to fresh blocks
    assert torch.equal(cache[:, other.long()], before[:, table.long()])


def test_compact_agrees_with_engine_layout_helper():
    """The engine's CPU path (worker.kv_layout.move_tokens_stacked) and the
    kernel move the same elements for the vLLM CPU 'vec' layout."""
    from vllm_kvshrink.serving.worker.kv_layout import TokenLayout, move_tokens_stacked

    bs, d, n_layers, heads = 32, 8, 2, 2
    t = torch.arange(bs)[:, None]
    j = torch.arange(d)[None, :]
    layout = TokenLayout(bs, d, j * bs + t, bs * d + t * d + j)
    assert layout.kind == "k_transposed"
    cache = _cache("cpu_k_transposed", n_layers, 5, bs, heads, d, torch.bfloat16)
    expected = cache.clone()
    table = torch.tensor([4, 1, 3], dtype=torch.int64)
    idx = _kept(n_layers, heads, 3 * bs, 45).long()
    dst = table[:2]
    pos = torch.arange(45)
    move_tokens_stacked(expected, layout, table[idx // bs], idx % bs, dst[pos // bs], pos % bs)
    compact_kv(cache, table, idx, dst, "cpu_k_transposed")
    assert torch.equal(cache, expected)


def test_compact_layer_list_one_allocation_and_separate():
    layout, bs, heads, d = "flash", 16, 2, 8
    whole = _cache(layout, 3, 4, bs, heads, d, torch.float16)
    layers = list(whole.unbind(0))  # slices of one allocation
    table = torch.tensor([1, 3], dtype=torch.int32)
    idx = _kept(3, heads, 32, 9)
    expected = whole.clone()
    ref.compact_kv_ref(expected, layout, table, idx, table[:1])
    compact_kv(layers, table, idx, table[:1], layout)
    assert torch.equal(whole, expected)
    separate = [c.clone() for c in _cache(layout, 3, 4, bs, heads, d, torch.float16)]
    compact_kv(separate, table, idx, table[:1], layout)
    assert torch.equal(torch.stack(separate), expected)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layout="paged"), "layout='paged' is not allowed"),
    (dict(idx_shape=(2, 3, 4)), r"src_index must be \[L=2, H=2, K\]"),
    (dict(dst=torch.tensor([0])), "dst_table has 1 blocks of 4 tokens"),
    (dict(idx_value=99), r"src_index holds values in \[0, 99\]; allowed: \[0, 8\)"),
    (dict(idx_dtype=torch.float32), "src_index has dtype torch.float32"),
])
def test_compact_rejects_bad_arguments(kwargs, match):
    cache = _cache("flash", 2, 4, 4, 2, 8, torch.float16)
    table = torch.tensor([0, 1])
    idx = torch.zeros(kwargs.get("idx_shape", (2, 2, 5)), dtype=kwargs.get("idx_dtype", torch.int64))
    if "idx_value" in kwargs:
        idx[0, 0, 0] = kwargs["idx_value"]
    with pytest.raises(ValueError, match=match):
        compact_kv(cache, table, idx, kwargs.get("dst", table), kwargs.get("layout", "flash"))


def test_compact_in_place_refuses_what_it_cannot_do_in_place():
    """staged=False over overlapping blocks needs dst_table to be a prefix of
    src_table and ascending sources; otherwise the error names staged=True,
    which handles the same input."""
    layout, bs = "flash", 4
    cache = _cache(layout, 1, 4, bs, 2, 8, torch.float16)
    table = torch.tensor([3, 1, 0], dtype=torch.int32)
    idx = torch.tensor([[[0, 5, 9], [1, 2, 11]]], dtype=torch.int32)
    unsorted = idx.flip(-1).contiguous()
    with pytest.raises(ValueError, match=r"strictly increasing; src_index\[0, 0, 0:2\]=\[9, 5\]"):
        compact_kv(cache, table, unsorted, table[:1], layout)
    with pytest.raises(ValueError, match=r"prefix of src_table .* use staged=True"):
        compact_kv(cache, table, idx, table[1:2], layout)
    for dst in (table[:1], table[1:2]):
        for sources in (idx, unsorted):
            got, expected = cache.clone(), cache.clone()
            ref.compact_kv_ref(expected, layout, table, sources, dst)
            compact_kv(got, table, sources, dst, layout, staged=True)
            assert torch.equal(got, expected)


# ==========================================================================
# merge
# ==========================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    h, n, d, groups = 3, 37, 24, 6
    keys = torch.randn(h, n, d, generator=g).to(dtype)
    values = torch.randn(h, n, d, generator=g).to(dtype)
    weights = torch.rand(h, n, generator=g)
    group = torch.randint(-1, groups - 1, (h, n), generator=g)  # last group empty
    group[0] = -1  # head 0: nothing grouped
    out = merge_kv(keys, values, weights, group, groups)
    exp = ref.merge_kv_ref(keys, values, weights, group, groups)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for a, b in zip(out, exp):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    assert out[2][0].sum() == 0 and out[2][:, -1].sum() == 0
    assert torch.equal(out[0][:, -1], torch.zeros_like(out[0][:, -1]))
    # one group by hand
    sel = group[1] == 2
    w = weights[1, sel]
    by_hand = (keys[1, sel].float() * w[:, None]).sum(0) / w.sum()
    torch.testing.assert_close(out[0][1, 2].float(), by_hand, **tol)
    assert int(out[2][1, 2]) == int(sel.sum())


def test_merge_rejects_bad_arguments():
    k = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 5\)"):
        merge_kv(k, k, torch.rand(2, 4), torch.zeros(2, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="group has dtype torch.float32"):
        merge_kv(k, k, torch.rand(2, 5), torch.zeros(2, 5), 2)


# ==========================================================================
# KIVI
# ==========================================================================
def test_kivi_quantize_keys_per_channel_values_per_token():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 16, 8, generator=g)
    keys[..., 3] += 50.0  # an outlier channel: per-channel groups absorb it
    values = torch.randn(2, 16, 8, generator=g)
    qk, qv = kivi_quantize(keys, values, 4, 8)
    assert qk.packed.shape == (2, 8, 8) and qk.scale.shape == (2, 8, 2)
    assert qv.packed.shape == (2, 16, 4) and qv.scale.shape == (2, 16, 1)
    k_err = (dequantize(qk, 4, 8, "channel", torch.float32) - keys).abs().max()
    tok_err = (dequantize(quantize(keys, 4, 8), 4, 8, "token", torch.float32) - keys).abs().max()
    assert k_err < 0.5 and tok_err > 1.0


# ==========================================================================
# scoring
# ==========================================================================
SCORE_CASES = [
    # layout, dtype, block size, window, q heads, kv heads, head dim, seq len, causal
    ("flash", torch.float32, 1, 1, 2, 2, 16, 9, True),
    ("flash", torch.float16, 16, 5, 8, 2, 32, 37, True),
    ("cpu_k_transposed", torch.bfloat16, 32, 20, 4, 1, 16, 67, True),
    ("cpu_row_major", torch.float32, 128, 3, 6, 3, 8, 130, False),
]


@pytest.mark.parametrize("layout,dtype,bs,w,hq,hkv,d,n,causal", SCORE_CASES)
def test_window_scores_match_reference(layout, dtype, bs, w, hq, hkv, d, n, causal):
    g = torch.Generator().manual_seed(0)
    n_blocks = -(-n // bs) + 2
    cache = _cache(layout, 1, n_blocks, bs, hkv, d, dtype)[0]
    table = torch.randperm(n_blocks, generator=g)[: -(-n // bs)].to(torch.int32)
    query = (torch.randn(w, hq, d, generator=g) * 2).to(dtype)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=2e-2)
    for reduce in ("sum", "max"):
        for gqa_mean in (True, False):
            out = window_scores(query, cache, table, n, layout, reduce=reduce,
                                gqa_mean=gqa_mean, causal=causal)
            exp = ref.window_scores_ref(query, cache, layout, table, n, d**-0.5,
                                        reduce, gqa_mean, causal)
            assert out.shape == (hkv if gqa_mean else hq, n)
            torch.testing.assert_close(out, exp, **tol)
            if reduce == "sum":  # every window row is a distribution
                torch.testing.assert_close(out.sum(-1), torch.full_like(out[:, 0], w),
                                           atol=1e-3 * w, rtol=1e-3)


@pytest.mark.parametrize("kernel", [1, 3, 7, 31])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 5), (2, 37), (4, 1100)])
def test_pool_scores_match_reference(kernel, mode, rows, n):
    """Edges (a kernel wider than the row), one token, and rows longer than one
    program's block."""
    x = torch.rand(rows, n, generator=torch.Generator().manual_seed(n + kernel))
    out = pool_scores(x, kernel, mode)
    torch.testing.assert_close(out, ref.pool_scores_ref(x, kernel, mode), atol=1e-7, rtol=1e-6)
    if kernel == 1:
        assert torch.equal(out, x)


def test_window_scores_pooled_as_snapkv():
    """window_scores(pool=7) is the SnapKV score: the window's attention summed,
    averaged over each KV head's query heads, then average-pooled."""
    from vllm_kvshrink.methods.snapkv import SnapKV

    g = torch.Generator().manual_seed(4)
    hq, hkv, d, n, w, bs = 6, 2, 16, 45, 8, 16
    cache = _cache("flash", 1, 4, bs, hkv, d, torch.float32)[0]
    table = torch.tensor([2, 0, 3], dtype=torch.int32)
    query = torch.randn(w, hq, d, generator=g)
    out = window_scores(query, cache, table, n, "flash", pool=7)
    pos = torch.arange(n)
    keys = kv_views(cache[None], "flash")[0][0][table.long()[pos // bs], :, pos % bs]
    expected = SnapKV(pool_kernel=7).score(keys.permute(1, 0, 2), query.permute(1, 0, 2),
                                           torch.arange(n - w, n), d**-0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="pool=4 is not allowed; allowed: an odd int >= 1"):
        window_scores(query, cache, table, n, "flash", pool=4)
    with pytest.raises(ValueError, match="pool_mode='median' is not allowed"):
        window_scores(query, cache, table, n, "flash", pool=3, pool_mode="median")


def test_window_scores_reject_bad_arguments():
    cache = _cache("flash", 1, 4, 16, 2, 8, torch.float32)[0]
    table = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="3 heads, not a multiple of the 2 KV heads"):
        window_scores(torch.randn(2, 3, 8), cache, table, 20, "flash")
    with pytest.raises(ValueError, match="too few for seq_len=40"):
        window_scores(torch.randn(2, 4, 8), cache, table, 40, "flash")
    with pytest.raises(ValueError, match="key_cache has dtype torch.float32"):
        window_scores(torch.randn(2, 4, 8, dtype=torch.float16), cache, table, 20, "flash")


# ==========================================================================
# custom ops
# ==========================================================================
def test_ops_have_fake_implementations():
    """Shapes and dtypes from the fake kernels, as torch.compile sees them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 32, dtype=torch.float16)
        k, v, n, w = merge_kv(x, x, torch.empty(2, 8), torch.empty(2, 8, dtype=torch.int64), 3)
        assert k.shape == (2, 3, 32) and n.dtype == torch.int32
        cache = torch.empty(1, 4, 2, 16, 2, 32, dtype=torch.float16)
        s = window_scores(torch.empty(3, 4, 32, dtype=torch.float16), cache[0],
                          torch.empty(2, dtype=torch.int32), 20, "flash")
        assert s.shape == (2, 20) and s.dtype == torch.float32
        compact_kv(cache, torch.empty(2, dtype=torch.int32),
                   torch.empty(1, 2, 5, dtype=torch.int32), torch.empty(1, dtype=torch.int32),
                   "flash")


def test_opcheck_schemas():
    idx = _kept(1, 2, 8, 3)
    table = torch.tensor([0, 1], dtype=torch.int32)
    cache = _cache("flash", 1, 2, 4, 2, 8, torch.float16)
    torch.library.opcheck(torch.ops.kvshrink.compact_kv.default,
                          (cache, table, idx, table, "flash", False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.kvshrink.pool_scores.default, (torch.rand(2, 9), 3, "max"),
                          test_utils=("test_schema", "test_faketensor"))


def test_ops_compile_into_one_graph():
    """torch.compile(fullgraph=True) traces every op through its fake kernel
    (no graph break), and the compiled function gives the eager results."""

    def f(cache, table, idx, dst, x, query, keys, w, grp):
        compact_kv(cache, table, idx, dst, "flash")
        q = quantize(x, 4, 8)
        y = dequantize(q, 4, 8, dtype=x.dtype)
        s = window_scores(query, cache[0], table, 20, "flash", reduce="max", pool=3)
        mk, mv, n, ws = merge_kv(keys, keys, w, grp, 3)
        return y, s, mk, n

    def args():
        g = torch.Generator().manual_seed(5)
        cache = torch.randn(1, 4, 2, 16, 2, 32, generator=g).half()
        table = torch.tensor([2, 0], dtype=torch.int32)
        return (cache, table, _kept(1, 2, 20, 9), table[:1].clone(),
                torch.randn(2, 5, 16, generator=g), torch.randn(3, 4, 32, generator=g).half(),
                torch.randn(2, 7, 32, generator=g).half(), torch.rand(2, 7, generator=g),
                torch.randint(-1, 3, (2, 7), generator=g))

    eager_args, compiled_args = args(), args()
    expected = f(*eager_args)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*compiled_args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(compiled_args[0], eager_args[0])  # the compaction happened in both
