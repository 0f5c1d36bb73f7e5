"""The C++ quantizer (``kernels.cpu_lib.quantize``, what ``quant.quantize``
runs on CPU tensors) against the PyTorch reference (``reference.quantize_ref``)
bit for bit, and the pages a tier event writes with it (``quant.pack_tokens``
/ ``pack``) against the same pages quantized by the reference: the same
bytes, so the engine holds what the research path computes."""

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


def _by_reference(monkeypatch, fn):
    """``fn()`` with ``quant.quantize`` on the PyTorch reference."""
    from vllm_kvshrink.kernels import cpu_lib

    with monkeypatch.context() as m:
        m.setattr(cpu_lib, "quantize", lambda *args: None)
        return fn()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("d,bs,elem,dtype", [(64, 32, 4, torch.float32),
                                             (128, 16, 2, torch.bfloat16),
                                             (32, 32, 2, torch.float16)])
def test_pack_tokens_equals_the_pytorch_pack(ext, monkeypatch, form, d, bs, elem, dtype):
    pf = paged_form(form, d, bs, elem)
    g = torch.Generator().manual_seed(d)
    k, v = _tokens(g, 5, 301, d, dtype), _tokens(g, 5, 301, d, dtype)
    got = quant.pack_tokens(pf, k, v)
    want = _by_reference(monkeypatch, lambda: quant.pack_tokens(pf, k, v))
    assert got.dtype == torch.uint8 and got.shape == want.shape == (5, 301, pf.token_bytes)
    assert torch.equal(got, want)
    pages = quant.pack(pf, k, v)
    assert torch.equal(pages, _by_reference(monkeypatch, lambda: quant.pack(pf, k, v)))
    # and they read back as the tokens, up to the form's error
    kk, _ = ext.unpack(pf, pages, 301)
    assert float((kk - k.float()).norm() / k.float().norm()) < {8: 0.02, 4: 0.2, 2: 0.7}[
        pf.k_bits]


def test_quantize_of_nothing(ext):
    packed, scale, zero = ext.quantize(torch.zeros(3, 0, 64), 4, 64, torch.bfloat16)
    assert packed.shape == (3, 0, 32) and scale.shape == zero.shape == (3, 0, 1)


def test_quantize_refuses_bad_shapes(ext):
    scale, zero = (torch.empty(2, dtype=torch.bfloat16) for _ in range(2))
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.kvshrink_cpu.quantize_groups(torch.empty(2, 32, dtype=torch.uint8), scale,
                                               zero, torch.zeros(2, 64).double(), 4)
    with pytest.raises(RuntimeError, match="packed must be"):
        torch.ops.kvshrink_cpu.quantize_groups(torch.empty(2, 33, dtype=torch.uint8), scale,
                                               zero, torch.zeros(2, 64), 4)
    with pytest.raises(RuntimeError, match="not whole bytes"):
        torch.ops.kvshrink_cpu.quantize_groups(torch.empty(2, 2, dtype=torch.uint8), scale,
                                               zero, torch.zeros(2, 5), 4)


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("shape,group", [((3, 50, 64), 64), ((2, 64, 96), 32), ((4, 9, 40), 8),
                                         ((1, 3, 128), 16)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_quantize_equals_the_reference(ext, bits, shape, group, dtype):
    """The quantizer ``quant.quantize`` runs on CPU tensors (bf16 parameters):
    the reference's codes, scales and zero points, bit for bit."""
    from vllm_kvshrink.kernels.reference import quantize_ref

    g = torch.Generator().manual_seed(bits * group)
    x = (torch.randn(*shape, generator=g) * torch.rand(*shape[:2], 1, generator=g) * 5)
    x[0, 0] = 2.0  # a constant group: scale 0 -> 1
    x = x.to(dtype)
    got = ext.quantize(x, bits, group, torch.bfloat16)
    want = quantize_ref(x, bits, group, torch.bfloat16)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # quant.quantize takes it, per token and per channel
    assert torch.equal(quant.quantize(x, bits, group, "token", torch.bfloat16).packed, want[0])
    if shape[1] >= 8:  # groups of 8 tokens per channel
        xc = x[:, : shape[1] // 8 * 8]
        by_channel = quant.quantize(xc, bits, 8, "channel", torch.bfloat16)
        ref_channel = quantize_ref(xc.transpose(1, 2), bits, 8, torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip(by_channel, ref_channel))
    assert ext.quantize(x, bits, group, torch.float32) is None  # fp32 parameters: the reference


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("shape,group", [((3, 50, 64), 64), ((2, 64, 96), 32), ((4, 9, 40), 8),
                                         ((1, 3, 128), 16)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_roundtrip_equals_reference_dequantize(ext, bits, shape, group, dtype):
    """``quant.roundtrip`` (the C++ one-pass twin on CPU tensors) gives the
    reference's quantize then dequantize values, bit for bit: ranges from
    tiny to large, a constant group, ties at half steps."""
    from vllm_kvshrink.kernels.reference import dequantize_ref, quantize_ref

    g = torch.Generator().manual_seed(bits * group + 1)
    x = _tokens(g, shape[0], shape[1], shape[2], torch.float32)
    x = x * torch.logspace(-4, 4, shape[1])[None, :, None]
    x[0, 0] = 2.0
    x = x.to(dtype)
    want = dequantize_ref(*quantize_ref(x, bits, group, torch.bfloat16), bits, group,
                          torch.float32)
    got = quant.roundtrip(x, bits, group)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, want)
    from vllm_kvshrink.kernels import cpu_lib

    assert cpu_lib.roundtrip(x, bits, group) is not None  # the C++ path was the one taken


def test_roundtrip_refuses_bad_shapes(ext):
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.kvshrink_cpu.roundtrip_groups(torch.empty(2, 64), torch.zeros(2, 64).double(),
                                                4)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.kvshrink_cpu.roundtrip_groups(torch.empty(2, 32), torch.zeros(2, 64), 4)
    with pytest.raises(ValueError, match="group_size"):
        quant.roundtrip(torch.zeros(2, 3, 64), 4, 48)


@pytest.mark.parametrize("d", (16, 64, 128))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_rotation_is_the_hadamard_product(ext, d, dtype):
    """``hadamard.rotate`` on CPU tensors runs the kernels' fast transform:
    the matrix product's values up to float rounding, its own inverse, and
    a bf16 input rotated as its float32 values are."""
    from vllm_kvshrink.kernels import cpu_lib
    from vllm_kvshrink.kernels.hadamard import hadamard, rotate

    g = torch.Generator().manual_seed(d)
    x = (torch.randn(3, 17, d, generator=g) * torch.logspace(-3, 3, 17)[None, :, None]).to(dtype)
    got = rotate(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, cpu_lib.hadamard_rows(x))  # the C++ path was the one taken
    want = x.double() @ hadamard(d).double()
    assert float(((got.double() - want).abs() / want.abs().amax(-1, keepdim=True)).max()) < 1e-6
    assert torch.allclose(rotate(got), x.float(), rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    if dtype == torch.bfloat16:
        assert torch.equal(got, rotate(x.float()))


def test_rotation_falls_back_where_the_transform_does_not_apply(ext):
    from vllm_kvshrink.kernels import cpu_lib
    from vllm_kvshrink.kernels.hadamard import hadamard, rotate

    x = torch.randn(2, 5, 8)
    assert cpu_lib.hadamard_rows(x) is None  # below 16 channels: the matrix product
    assert torch.equal(rotate(x), x @ hadamard(8))
    with pytest.raises(ValueError, match="power of two"):
        rotate(torch.zeros(2, 96))
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.kvshrink_cpu.hadamard_rows(torch.empty(2, 96), torch.zeros(2, 96))
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.kvshrink_cpu.hadamard_rows(torch.empty(2, 64), torch.zeros(2, 64).double())
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.kvshrink_cpu.hadamard_rows(torch.empty(2, 32), torch.zeros(2, 64))


@pytest.mark.parametrize("form", [f for f in FORMS if f.endswith("_rot")])
def test_pages_read_back_as_the_research_paths_values(ext, form):
    """A rotated form's pages (``quant.pack``, what a tier event writes) read
    back (``unpack_pages``, what the engine's events read) as exactly the
    values the research path holds for the same tokens
    (``StorageForm.roundtrip``): both rotate with the same transform."""
    from vllm_kvshrink.storage import get_form

    d = 64
    pf = paged_form(form, d, 32, 2)
    g = torch.Generator().manual_seed(7)
    k, v = (_tokens(g, 4, 150, d, torch.float32).to(torch.bfloat16) for _ in range(2))
    ku, vu = ext.unpack(pf, quant.pack(pf, k, v), 150)
    kr, vr = get_form(form).roundtrip(k.float(), v.float())
    assert torch.equal(ku, kr) and torch.equal(vu, vr)
