"""The C++ pack (``kernels.cpu_ext.pack_tokens`` / ``pack``, what a tier event
writes for the tokens entering a packed form) against the PyTorch one
(``kernels.quant.pack_tokens`` / ``pack``): the same bytes, codes and bf16
parameters, so the engine holds what the research path computes."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.kernels import quant
from vllm_kvshrink.storage.paged import paged_form

FORMS = ("int8_tok", "int4_tok", "int2_tok", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot")


def _tokens(g, a, n, d, dtype):
    # rows of very different ranges, a constant row (scale 0 -> 1), ties at
    # half steps (integers over a range that is a multiple of the levels)
    k = torch.randn(a, n, d, generator=g) * torch.rand(a, n, 1, generator=g) * 6
    k[0, 0] = 0.75
    k[0, 1] = torch.arange(d) % 7 - 3.0
    k[0, 2] = (torch.arange(d) % 31) * 0.5
    return k.to(dtype)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("d,bs,elem,dtype", [(64, 32, 4, torch.float32),
                                             (128, 16, 2, torch.bfloat16),
                                             (32, 32, 2, torch.float16)])
def test_pack_tokens_equals_the_pytorch_pack(ext, form, d, bs, elem, dtype):
    pf = paged_form(form, d, bs, elem)
    g = torch.Generator().manual_seed(d)
    k, v = _tokens(g, 5, 301, d, dtype), _tokens(g, 5, 301, d, dtype)
    got, want = ext.pack_tokens(pf, k, v), quant.pack_tokens(pf, k, v)
    assert got.dtype == torch.uint8 and got.shape == want.shape == (5, 301, pf.token_bytes)
    assert torch.equal(got, want)
    pages = ext.pack(pf, k, v)
    assert torch.equal(pages, quant.pack(pf, k, v))
    # and they read back as the tokens, up to the form's error
    kk, _ = ext.unpack(pf, pages, 301)
    assert float((kk - k.float()).norm() / k.float().norm()) < {8: 0.02, 4: 0.2, 2: 0.7}[
        pf.k_bits]


def test_pack_tokens_of_nothing(ext):
    pf = paged_form("int4_tok_rot", 64, 32, 4)
    out = ext.pack_tokens(pf, torch.zeros(3, 0, 64), torch.zeros(3, 0, 64))
    assert out.shape == (3, 0, pf.token_bytes)


def test_pack_tokens_refuses_bad_shapes(ext):
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.kvshrink_cpu.pack_tokens(torch.empty(1, 2, 40, dtype=torch.uint8),
                                           torch.zeros(1, 2, 64), torch.zeros(1, 3, 64), 2, 2)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.kvshrink_cpu.pack_tokens(torch.empty(1, 2, 41, dtype=torch.uint8),
                                           torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), 2, 2)
