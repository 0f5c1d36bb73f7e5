"""The engine's packed pages hold exactly what the research path's forms
give back, in exactly the bytes the forms state."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.kernels.quant import pack, unpack
from vllm_kvshrink.storage import form_names, get_form
from vllm_kvshrink.storage.paged import pageable, paged_form

TOKEN_FORMS = [n for n in form_names() if n != "bf16" and pageable(n)]


@pytest.mark.parametrize("name", TOKEN_FORMS)
@pytest.mark.parametrize("elem_bytes,block_size", [(2, 32), (4, 32), (2, 128)])
def test_pages_read_back_the_research_roundtrip_bit_for_bit(name, elem_bytes, block_size):
    torch.manual_seed(0)
    pf = paged_form(name, 64, block_size, elem_bytes)
    f = get_form(name)
    assert pf.capacity == f.tokens_per_page(64, block_size, elem_bytes)
    assert pf.token_bytes * pf.capacity <= pf.region_bytes
    n = 2 * pf.capacity + 7  # two full pages and a partial one
    k = torch.randn(6, n, 64) * 3
    v = torch.randn(6, n, 64)
    pages = pack(pf, k, v)
    assert pages.shape == (6, 3, pf.region_bytes)
    k2, v2 = unpack(pf, pages, n)
    kr, vr = f.roundtrip(k, v)
    assert torch.equal(k2, kr) and torch.equal(v2, vr)
    # the bytes a page uses are the form's own count
    assert pf.token_bytes == f.nbytes(1, 64)


def test_channel_forms_cannot_be_paged():
    assert not pageable("int4") and pageable("int4_tok_rot") and pageable("bf16")
    with pytest.raises(ValueError, match=r"per-channel groups.*\*_tok"):
        paged_form("int4", 64, 32, 2)


def test_rotated_pages_store_the_rotated_space():
    from vllm_kvshrink.kernels.hadamard import rotate

    torch.manual_seed(1)
    pf = paged_form("int8_tok_rot", 64, 32, 2)
    k, v = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    kr, _ = unpack(pf, pack(pf, k, v), 10, rotated=True)
    assert float((kr - rotate(k)).abs().max()) < 0.05
    assert float((kr - k).abs().max()) > 0.5
