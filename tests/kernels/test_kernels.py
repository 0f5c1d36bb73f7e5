"""The engine's quantizer (``kernels.quant``): Triton kernels vs their PyTorch
references, in Triton's CPU interpreter.  Packed attention is
``test_packed_attention.py``; the lab kernels, ``test_lab_kernels.py``.

The interpreter is switched on for the whole group (``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.kernels import reference as ref
from vllm_kvshrink.kernels.quant import dequantize, quantize


pytestmark = pytest.mark.usefixtures("triton_interpreter")


# ==========================================================================
# quantization
# ==========================================================================
QUANT_CASES = [
    # bits, dtype, shape, group size, axis
    (2, torch.float16, (2, 7, 32), 16, "token"),
    (4, torch.bfloat16, (3, 5, 24), 8, "token"),
    (8, torch.float32, (1, 9, 20), 20, "token"),
    (2, torch.float32, (2, 32, 12), 32, "channel"),
    (4, torch.float16, (1, 16, 8), 4, "channel"),
    (8, torch.bfloat16, (2, 6, 8), 3, "channel"),
]


@pytest.mark.parametrize("bits,dtype,shape,gs,axis", QUANT_CASES)
def test_quantize_bit_exact_and_dequantize_close(bits, dtype, shape, gs, axis):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 3).to(dtype)
    q = quantize(x, bits, gs, axis=axis)
    x3 = x.transpose(1, 2) if axis == "channel" else x
    exp = ref.quantize_ref(x3, bits, gs, dtype)
    for name, a, b in zip(("packed", "scale", "zero"), q, exp):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    out = dequantize(q, bits, gs, axis=axis, dtype=dtype)
    exp_x = ref.dequantize_ref(*exp, bits, gs, dtype)
    exp_x = exp_x.transpose(1, 2) if axis == "channel" else exp_x
    assert out.shape == x.shape
    # the interpreter casts fp32 to bf16 by truncation, the reference rounds
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out, exp_x, atol=1e-6, rtol=rtol)
    # error at most half a step (plus the rounding of the stored parameters)
    step = q.scale.float().repeat_interleave(gs, dim=-1)
    step = step.transpose(1, 2) if axis == "channel" else step
    err = (out.float() - x.float()).abs()
    assert (err <= 0.5 * step + 0.02 * x.float().abs() + 1e-3).all()


def test_quantize_rounds_ties_to_even_and_packs_little_endian():
    # scale = (3 - 0) / 3 = 1 and zero = 0: codes are round-half-even(x)
    x = torch.tensor([[[0.0, 0.5, 1.5, 2.5, 3.0, 0.4, 2.6, 1.0]]])
    q = quantize(x, 2, 8)
    codes = [0, 0, 2, 2, 3, 0, 3, 1]
    byte0 = codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6
    byte1 = codes[4] | codes[5] << 2 | codes[6] << 4 | codes[7] << 6
    assert q.packed.tolist() == [[[byte0, byte1]]]
    assert q.scale.item() == 1.0 and q.zero.item() == 0.0
    assert ref.unpack_ref(q.packed, 2).flatten().tolist() == codes
    # a constant group: scale is stored as 1, every code 0, exact round trip
    c = torch.full((1, 2, 16), -1.25, dtype=torch.float16)
    qc = quantize(c, 4, 16)
    assert torch.equal(qc.scale, torch.ones_like(qc.scale)) and qc.packed.eq(0).all()
    assert torch.equal(dequantize(qc, 4, 16, dtype=torch.float16), c)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits=3 is not allowed"),
    (dict(bits=4, gs=6), "has 16 elements, not a multiple of group_size=6"),
    (dict(gs=2), "group_size=2 must be a multiple of 4"),
    (dict(axis="head"), "axis='head' is not allowed"),
    (dict(param_dtype=torch.int8), "param_dtype=torch.int8 is not allowed"),
])
def test_quantize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(1, 4, 16), kwargs.get("bits", 2), kwargs.get("gs", 8),
                 axis=kwargs.get("axis", "token"), param_dtype=kwargs.get("param_dtype"))


# ==========================================================================
# custom ops
# ==========================================================================
def test_ops_have_fake_implementations():
    """Shapes and dtypes from the fake kernels, as torch.compile sees them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 32, dtype=torch.float16)
        q = quantize(x, 4, 16)
        assert q.packed.shape == (2, 8, 16) and q.scale.dtype == torch.float16
        assert dequantize(q, 4, 16, dtype=torch.bfloat16).shape == (2, 8, 32)


def test_opcheck_schemas():
    x = torch.randn(1, 3, 16)
    torch.library.opcheck(torch.ops.kvshrink.quantize.default, (x, 4, 8, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    q = quantize(x, 4, 8)
    torch.library.opcheck(torch.ops.kvshrink.dequantize.default,
                          (*q, 4, 8, torch.float32, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_ops_compile_into_one_graph():
    """torch.compile(fullgraph=True) traces the quantizer through its fake
    kernels (no graph break), and the compiled function gives the eager
    results."""

    def f(x):
        q = quantize(x, 4, 8)
        return dequantize(q, 4, 8, dtype=x.dtype), q.packed

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5))
    expected = f(x)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
