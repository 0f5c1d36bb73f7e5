"""All-layers-at-once reads and moves equal the per-layer generic path."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.kernels.layouts import stack_layers
from vllm_kvshrink.serving.worker.kv_layout import (
    TokenLayout,
    move_tokens,
    move_tokens_stacked,
    read_keys,
    read_keys_stacked,
    read_row_stacked,
    read_values_stacked,
    row_slots,
    write_tokens_stacked,
)


def _layout(kind: str, bs: int, d: int) -> TokenLayout:
    t = torch.arange(bs)[:, None]
    j = torch.arange(d)[None, :]
    v = bs * d + t * d + j
    if kind == "k_transposed":
        k = j * bs + t
    elif kind == "row_major":
        k = t * d + j
    else:  # a scrambled layout exercises the generic index-map path
        perm = torch.randperm(2 * bs * d, generator=torch.Generator().manual_seed(0))
        k, v = perm[: bs * d].view(bs, d), perm[bs * d :].view(bs, d)
    return TokenLayout(bs, d, k, v)


@pytest.mark.parametrize("kind", ["k_transposed", "row_major", "generic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stacked_equals_per_layer(kind, dtype):
    layers, nb, h, bs, d = 5, 12, 3, 32, 64
    lay = _layout(kind, bs, d)
    assert lay.kind == kind
    base = torch.randn(layers * nb * h * bs * 2 * d).to(dtype)
    per_layer = [c.view(nb, h, bs, 2 * d) for c in base.clone().chunk(layers)]
    stack_src = base.clone()
    stacked_caches = [c.view(nb, h, bs, 2 * d) for c in stack_src.chunk(layers)]
    stack = stack_layers(stacked_caches, contiguous=True)
    assert stack is not None and stack.shape == (layers, nb, h, bs, 2 * d)
    blocks = torch.randint(0, nb, (77,))
    offs = torch.randint(0, bs, (77,))
    got = read_keys_stacked(stack, lay, blocks, offs)
    want = torch.stack([read_keys(c, lay, blocks, offs, fast=False) for c in per_layer])
    assert torch.equal(got, want)
    n_src, n_keep = 150, 41
    g = torch.Generator().manual_seed(1)
    keep = torch.sort(torch.stack([torch.randperm(n_src, generator=g)[:n_keep]
                                   for _ in range(layers * h)]), dim=-1).values
    keep = keep.view(layers, h, n_keep)
    table = torch.randperm(nb, generator=g)[:5]
    region = torch.tensor([table[0].item(), table[1].item()])
    dst = torch.arange(n_keep)
    move_tokens_stacked(stack, lay, table[keep // bs], keep % bs, region[dst // bs], dst % bs)
    for i, c in enumerate(per_layer):
        move_tokens(c, lay, table[keep[i] // bs], keep[i] % bs, region[dst // bs], dst % bs,
                    fast=False)
    assert torch.equal(stack_src, torch.cat([c.flatten() for c in per_layer]))


@pytest.mark.parametrize("kind", ["k_transposed", "row_major", "generic"])
def test_values_and_writes_follow_the_index_maps(kind):
    """Reading values and writing new tokens (merges, tier pages) agree with a
    plain element-by-element walk of the layout's index maps -- the generic
    path is the one vLLM's AMX layout takes."""
    layers, nb, h, bs, d = 3, 6, 2, 32, 16
    lay = _layout(kind, bs, d)
    caches = [c.view(nb, h, bs, 2 * d) for c in torch.randn(layers * nb * h * bs * 2 * d)
              .to(torch.bfloat16).chunk(layers)]
    stack = stack_layers(caches, contiguous=True)
    g = torch.Generator().manual_seed(2)
    blocks, offs = torch.randint(0, nb, (9,), generator=g), torch.randint(0, bs, (9,), generator=g)
    flat = stack.reshape(layers, nb, h, 2 * bs * d)
    want = torch.empty(layers, h, 9, d, dtype=stack.dtype)
    for li in range(layers):
        for hi in range(h):
            for n in range(9):
                want[li, hi, n] = flat[li, blocks[n], hi, lay.value_index[offs[n]]]
    assert torch.equal(read_values_stacked(stack, lay, blocks, offs), want)
    dst_b = torch.tensor([1, 1, 4, 5])
    dst_o = torch.tensor([0, 7, 31, 3])
    keys = torch.randn(layers, h, 4, d, generator=g)
    vals = torch.randn(layers, h, 4, d, generator=g)
    before = flat.clone()
    write_tokens_stacked(stack, lay, keys, vals, dst_b, dst_o)
    expect = before.clone()
    for li in range(layers):
        for hi in range(h):
            for n in range(4):
                expect[li, dst_b[n], hi, lay.key_index[dst_o[n]]] = keys[li, hi, n].bfloat16()
                expect[li, dst_b[n], hi, lay.value_index[dst_o[n]]] = vals[li, hi, n].bfloat16()
    assert torch.equal(flat, expect)


def test_stack_refuses_non_adjacent_layers():
    a = torch.zeros(4, 3, 32, 128)
    b = torch.zeros(4, 3, 32, 128)
    assert stack_layers([a, b], contiguous=True) is None


@pytest.mark.parametrize("kind", ["k_transposed", "row_major", "generic"])
@pytest.mark.parametrize("n", [1, 31, 32, 70])
def test_row_read_equals_slot_reads(kind, n):
    """A row read a block at a time gives the slot-by-slot reads' tensors."""
    layers, nb, h, bs, d = 4, 10, 3, 32, 64
    lay = _layout(kind, bs, d)
    stack = torch.randn(layers, nb, h, bs, 2 * d).bfloat16()
    row = [7, 2, 9, 4]  # more blocks than the row's n tokens need
    blocks, offs = row_slots(row, torch.arange(n), bs)
    keys = read_row_stacked(stack, lay, row, n, "keys")
    values = read_row_stacked(stack, lay, row, n, "values")
    assert keys.shape == values.shape == (layers, h, n, d)
    assert torch.equal(keys, read_keys_stacked(stack, lay, blocks, offs))
    assert torch.equal(values, read_values_stacked(stack, lay, blocks, offs))
    with pytest.raises(ValueError, match="half must be"):
        read_row_stacked(stack, lay, row, n, "both")
