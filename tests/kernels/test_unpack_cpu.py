"""The C++ unpack (``kernels.cpu_ext.unpack``, what a tier event reads of
the tokens a request holds packed) against the PyTorch one
(``kernels.quant.unpack``) on pages written by ``kernels.quant.pack``."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.kernels.quant import pack, unpack
from vllm_kvshrink.storage.paged import paged_form

FORMS = ("int8_tok", "int4_tok", "int2_tok", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot")



@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("d,bs,elem", [(64, 32, 2), (128, 16, 4), (32, 32, 2)])
def test_unpack_equals_the_pytorch_unpack(ext, form, d, bs, elem):
    pf = paged_form(form, d, bs, elem)
    g = torch.Generator().manual_seed(d + bs)
    tokens = 2 * pf.capacity + 5  # two full pages and part of a third
    k = torch.randn(6, tokens, d, generator=g) * torch.rand(6, tokens, 1, generator=g) * 4
    v = torch.randn(6, tokens, d, generator=g)
    pages = pack(pf, k, v)
    for n in (tokens, tokens - 3, pf.capacity, 1, 0):
        want = unpack(pf, pages, n)
        got = ext.unpack(pf, pages, n)
        for a, b in zip(got, want):
            assert a.shape == b.shape == (6, n, d)
            # rotated forms: butterflies here, a matmul there; float32 rounding
            # of a sum of d terms the size of the row's largest value
            atol = 4e-6 * float(b.abs().max()) if pf.rotate and n else 1e-6
            torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)
    # and the values are the stored tokens, up to the form's error
    kk, _ = ext.unpack(pf, pages, tokens)
    assert float((kk - k).norm() / k.norm()) < {8: 0.02, 4: 0.2, 2: 0.7}[pf.k_bits]


def test_unpack_refuses_more_tokens_than_the_pages_hold(ext):
    pf = paged_form("int4_tok_rot", 64, 32, 2)
    pages = pack(pf, torch.randn(2, 10, 64), torch.randn(2, 10, 64))
    with pytest.raises(RuntimeError, match="do not fit"):
        ext.unpack(pf, pages, pages.shape[1] * pf.capacity + 1)
