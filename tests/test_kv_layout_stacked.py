"""All-layers-at-once reads and moves equal the per-layer generic path."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.worker.kv_layout import (
    TokenLayout,
    move_tokens,
    move_tokens_stacked,
    read_keys,
    read_keys_stacked,
    stack_layers,
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
    stack = stack_layers(stacked_caches)
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


def test_stack_refuses_non_adjacent_layers():
    a = torch.zeros(4, 3, 32, 128)
    b = torch.zeros(4, 3, 32, 128)
    assert stack_layers([a, b]) is None
