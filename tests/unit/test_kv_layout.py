"""Tests of vllm_kvshrink.serving.worker.kv_layout against vLLM's real CPU cache-write op.

The cache of one layer is ``[num_blocks, H, block_size, 2 * D]``; vLLM's CPU
attention splits it as ``cache.view(nb, H, 2 * bs, D).chunk(2, dim=2)`` and
writes tokens with ``_custom_ops.cpu_attn_reshape_and_cache``.  Everything the
plugin reads or moves is compared with what that op writes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

ops = pytest.importorskip("vllm._custom_ops")
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")

from vllm_kvshrink.serving.worker.kv_layout import (  # noqa: E402
    TokenLayout,
    move_tokens,
    probe_layout,
    read_keys,
    row_slots,
)

if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):  # pragma: no cover
    pytest.skip("vLLM CPU ops not built into this wheel", allow_module_level=True)


class Cache:
    """One layer's paged cache plus the vLLM write op configured for it."""

    def __init__(self, model_dtype, num_blocks, heads, block_size, head_size,
                 kv_cache_dtype="auto"):
        self.model_dtype = model_dtype
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8 = kv_cache_dtype.startswith("fp8")
        self.dtype = torch.uint8 if self.fp8 else model_dtype
        self.read_dtype = torch.float8_e4m3fn if self.fp8 else None
        self.shape = (num_blocks, heads, block_size, 2 * head_size)
        self.isa = cpu_attn._get_attn_isa(
            model_dtype, block_size, head_size, kv_cache_dtype if self.fp8 else None)

    def write(self, key, value, cache, slots):
        """``write(key, value, kv_cache, slot_mapping)``, as probe_layout wants."""
        nb, h, bs, _ = cache.shape
        kc, vc = cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            key.to(self.model_dtype).contiguous(), value.to(self.model_dtype).contiguous(),
            kc, vc, slots.to(torch.int64), self.isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype=self.kv_cache_dtype,
        )

    def empty(self, seed=0):
        """A cache full of (finite) junk, so untouched slots are recognisable."""
        g = torch.Generator().manual_seed(seed)
        if self.fp8:
            junk = torch.randn(self.shape, generator=g).clamp(-100, 100)
            return junk.to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.randn(self.shape, generator=g).to(self.dtype)

    def tokens(self, n, heads, head_size, seed):
        """Random K, V ``[n, H, D]`` exactly representable in the cache dtype."""
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(n, heads, head_size, generator=g)
        v = torch.randn(n, heads, head_size, generator=g)
        if self.fp8:
            k, v = k.to(torch.float8_e4m3fn).float(), v.to(torch.float8_e4m3fn).float()
        return k.to(self.model_dtype), v.to(self.model_dtype)

    def as_float(self, x):
        if self.fp8:
            return x.view(torch.float8_e4m3fn).to(torch.float32)
        return x.to(torch.float32)

    def layout(self):
        _, h, bs, d2 = self.shape
        return probe_layout(self.write, h, bs, d2 // 2, self.dtype, self.read_dtype)


def _fp8_cache(model_dtype, *shape):
    try:
        return Cache(model_dtype, *shape, kv_cache_dtype="fp8")
    except NotImplementedError as e:
        pytest.skip(f"fp8 KV cache not usable on this CPU: {e}")


def _read_values(cache, layout, blocks, offsets):
    nb, h = cache.shape[:2]
    flat = cache.view(nb, h, layout.region_size)
    idx = layout.value_index[offsets]
    return flat[blocks[:, None, None], torch.arange(h)[None, :, None], idx[:, None, :]
                ].permute(1, 0, 2)


def _check_layout(layout: TokenLayout, bs, d):
    assert layout.key_index.shape == (bs, d) and layout.value_index.shape == (bs, d)
    assert layout.region_size == 2 * bs * d
    tok = layout.token_index
    assert tok.shape == (bs, 2 * d)
    # every element of a (block, head) region belongs to exactly one (token, dim)
    assert torch.equal(tok.flatten().sort().values, torch.arange(2 * bs * d))


# --------------------------------------------------------------- round trip
ROUND_TRIP = list(itertools.product(
    [torch.bfloat16, torch.float16, torch.float32], [32, 128], [64, 128], [1, 3, 8]))


@pytest.mark.parametrize("dtype, bs, d, heads", ROUND_TRIP)
def test_probe_and_read_keys_round_trip(dtype, bs, d, heads):
    c = Cache(dtype, 5, heads, bs, d)
    layout = c.layout()
    _check_layout(layout, bs, d)
    cache = c.empty(seed=bs + d + heads)
    n = min(3 * bs, 150)
    g = torch.Generator().manual_seed(n)
    slots = torch.randperm(5 * bs, generator=g)[:n]
    k, v = c.tokens(n, heads, d, seed=heads)
    c.write(k, v, cache, slots)
    blocks, offsets = slots // bs, slots % bs
    got = read_keys(cache, layout, blocks, offsets)
    assert got.shape == (heads, n, d) and got.dtype == dtype
    assert torch.equal(got, k.permute(1, 0, 2))
    assert torch.equal(_read_values(cache, layout, blocks, offsets), v.permute(1, 0, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [80, 112])
def test_round_trip_vec16_isa(dtype, d):
    """Head sizes that are not a multiple of 32 take vLLM's 'vec16' path."""
    c = Cache(dtype, 3, 2, 32, d)
    assert c.isa == "vec16"
    layout = c.layout()
    _check_layout(layout, 32, d)
    cache = c.empty()
    slots = torch.tensor([0, 5, 31, 32, 63, 64, 90])
    k, v = c.tokens(len(slots), 2, d, seed=1)
    c.write(k, v, cache, slots)
    got = read_keys(cache, layout, slots // 32, slots % 32)
    assert torch.equal(got, k.permute(1, 0, 2))


@pytest.mark.parametrize("model_dtype, bs, d, heads",
                         [(torch.bfloat16, 32, 64, 3), (torch.float16, 128, 128, 8),
                          (torch.float32, 32, 128, 1)])
def test_round_trip_fp8(model_dtype, bs, d, heads):
    c = _fp8_cache(model_dtype, 4, heads, bs, d)
    assert c.dtype == torch.uint8  # vLLM's CPU fp8 cache (STR_DTYPE_TO_TORCH_DTYPE)
    layout = c.layout()
    _check_layout(layout, bs, d)
    cache = c.empty(seed=2)
    slots = torch.randperm(4 * bs, generator=torch.Generator().manual_seed(0))[:bs + 7]
    k, v = c.tokens(len(slots), heads, d, seed=3)
    c.write(k, v, cache, slots)
    got = read_keys(cache, layout, slots // bs, slots % bs)
    assert got.dtype == torch.uint8 and got.shape == (heads, len(slots), d)
    assert torch.equal(c.as_float(got), k.float().permute(1, 0, 2))


def test_vllm_fp8_cache_dtype_is_uint8():
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    assert STR_DTYPE_TO_TORCH_DTYPE["fp8"] == torch.uint8


def test_probe_rejects_a_broken_writer():
    def drops_last_token(key, value, cache, slots):
        Cache(torch.float32, 1, key.shape[1], 32, key.shape[2]).write(
            key[:-1], value[:-1], cache, slots[:-1])

    with pytest.raises(RuntimeError, match="layout probe"):
        probe_layout(drops_last_token, 2, 32, 64, torch.float32)


# ------------------------------------------------------------------ moves
def _compaction_case(c: Cache, heads, bs, d, new_region, seed):
    """Request of ``p`` tokens in blocks ``old``; per-head kept indices; the
    expected cache built by writing the kept K/V at the destinations with vLLM's op."""
    old = [2, 4, 1]  # block-table row, deliberately not in block order
    p = 2 * bs + bs // 2 + 3  # odd, last block partly filled
    cache = c.empty(seed=seed)
    k, v = c.tokens(p, heads, d, seed=seed + 1)
    pos = torch.arange(p)
    sb, so = row_slots(old, pos, bs)
    c.write(k, v, cache, sb * bs + so)
    original = cache.clone()

    g = torch.Generator().manual_seed(seed + 2)
    keep_n = bs + bs // 2 + 1  # spans two destination blocks
    sinks, recent = 2, 5
    middle = torch.arange(sinks, p - recent)
    keeps = []
    for _ in range(heads):  # a different selection per head
        chosen = middle[torch.randperm(len(middle), generator=g)[: keep_n - sinks - recent]]
        keeps.append(torch.cat([torch.arange(sinks), chosen, torch.arange(p - recent, p)])
                     .sort().values)
    keep = torch.stack(keeps)  # [H, K]
    assert len(set(map(tuple, keep.tolist()))) == heads or heads == 1

    table = torch.as_tensor(old)
    src_blocks, src_offsets = table[keep // bs], keep % bs
    dst = torch.arange(keep_n)
    dst_blocks, dst_offsets = row_slots(new_region, dst, bs)

    expected = original.clone()
    h_idx = torch.arange(heads)[None, :]
    k_exp = k[keep.T, h_idx]  # [K, H, D]: token keep[h, i] of head h at slot i
    v_exp = v[keep.T, h_idx]
    c.write(k_exp, v_exp, expected, dst_blocks * bs + dst_offsets)
    return cache, original, expected, (src_blocks, src_offsets, dst_blocks, dst_offsets)


MOVE_CASES = [
    (torch.bfloat16, 32, 64, 3),
    (torch.float16, 128, 128, 8),
    (torch.float32, 32, 128, 1),
    (torch.bfloat16, 128, 64, 2),
    (torch.float32, 32, 80, 2),  # vec16
]


@pytest.mark.parametrize("dtype, bs, d, heads", MOVE_CASES)
@pytest.mark.parametrize("new_region", [[2, 5], [2, 4]], ids=["new-block", "in-place"])
def test_move_tokens_matches_vllm_writes(dtype, bs, d, heads, new_region):
    c = Cache(dtype, 6, heads, bs, d)
    layout = c.layout()
    cache, original, expected, args = _compaction_case(c, heads, bs, d, new_region, seed=bs)
    src_blocks, src_offsets, dst_blocks, dst_offsets = args
    # the case really overlaps: some destinations are sources of other tokens
    src_slots = set((src_blocks * bs + src_offsets).flatten().tolist())
    dst_slots = set((dst_blocks * bs + dst_offsets).tolist())
    assert src_slots & dst_slots
    if new_region == [2, 5]:
        assert 5 in dst_blocks.tolist()

    move_tokens(cache, layout, src_blocks, src_offsets, dst_blocks, dst_offsets)
    # exact, raw bytes: destinations hold the kept tokens, everything else as before
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    changed = (cache != original).flatten(2).any(-1)  # [NB, H]
    assert not changed[[0, 3]].any()  # blocks outside old row and new region
    # and reading back through the layout gives the kept keys, per head
    got = read_keys(cache, layout, dst_blocks, dst_offsets)
    assert torch.equal(got, read_keys(expected, layout, dst_blocks, dst_offsets))


@pytest.mark.parametrize("new_region", [[2, 5], [2, 4]], ids=["new-block", "in-place"])
def test_move_tokens_fp8(new_region):
    bs, d, heads = 32, 64, 3
    c = _fp8_cache(torch.bfloat16, 6, heads, bs, d)
    layout = c.layout()
    cache, original, expected, args = _compaction_case(c, heads, bs, d, new_region, seed=11)
    move_tokens(cache, layout, *args)
    assert torch.equal(cache, expected)


def test_move_tokens_identity_and_swap():
    bs, d, heads = 32, 64, 2
    c = Cache(torch.float32, 2, heads, bs, d)
    layout = c.layout()
    cache = c.empty(seed=4)
    before = cache.clone()
    same = torch.arange(bs)
    move_tokens(cache, layout, torch.zeros(heads, bs, dtype=torch.int64),
                same.expand(heads, bs), torch.zeros(bs, dtype=torch.int64), same)
    assert torch.equal(cache, before)
    # swap tokens 0 and 1 of block 0 for both heads (reads happen before writes)
    src = torch.tensor([[1, 0], [1, 0]])
    move_tokens(cache, layout, torch.zeros(2, 2, dtype=torch.int64), src,
                torch.zeros(2, dtype=torch.int64), torch.tensor([0, 1]))
    blocks = torch.zeros(2, dtype=torch.int64)
    k_before = read_keys(before, layout, blocks, torch.tensor([0, 1]))
    k_after = read_keys(cache, layout, blocks, torch.tensor([1, 0]))
    assert torch.equal(k_before, k_after)
    assert torch.equal(_read_values(before, layout, blocks, torch.tensor([0, 1])),
                       _read_values(cache, layout, blocks, torch.tensor([1, 0])))


def test_row_slots():
    b, o = row_slots([7, 3, 9], torch.tensor([0, 31, 32, 70, 95]), 32)
    assert b.tolist() == [7, 7, 3, 9, 9]
    assert o.tolist() == [0, 31, 0, 6, 31]
    b, o = row_slots(torch.tensor([5]), torch.tensor([3]), 16)
    assert (b.tolist(), o.tolist()) == ([5], [3])
