"""vLLM 0.32's own KV formats as storage forms, checked against vLLM itself.

* ``nbytes`` against vLLM's page-size arithmetic (``page_size_bytes`` of the
  layer's ``FullAttentionSpec`` after the backend's ``customize_spec``);
* ``fp8`` codes bit for bit against the installed C++ CPU op, and the C++
  attention against attention over our round trip;
* the Triton formats against vLLM's own kernels run by the Triton interpreter
  in a subprocess: page bytes bit for bit, TurboQuant's dequant kernel, and
  the attention kernels' outputs;
* vLLM's pure-torch helpers (RHT, Hadamard, Lloyd-Max codebook) bit for bit;
* error bounds of every form on random and structured data.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_kvshrink.storage import baseline_names, get_form
from vllm_kvshrink.storage.vllm_formats import (
    FORMS,
    FP8CPU,
    Int4PerTokenHead,
    TurboQuant,
    fp8_e4m3_decode,
    fp8_e4m3_satfinite,
    lloyd_max_centroids,
    orthonormal_hadamard,
    rht,
    rht_signs,
)

NAMES = list(FORMS)
TQ_NAMES = [n for n in NAMES if n.startswith("turboquant_")]
PTH_NAMES = ["int8_per_token_head", "int4_per_token_head"]
BLOCK = 16  # page size (tokens) used for the kernel runs


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def _structured_row(p: int, d: int, g: torch.Generator) -> torch.Tensor:
    """One [D] vector of pattern ``p`` (the awkward cases of quantizers)."""
    r = torch.randn(d, generator=g)
    x = torch.zeros(d)
    if p == 0:
        pass  # all zeros
    elif p == 1:
        x = torch.full((d,), 0.7)  # constant
    elif p == 2:
        x[0] = 3.0  # one-hot on channel 0
    elif p == 3:
        x[5] = -2.5  # one-hot elsewhere
    elif p == 4:
        x = 40.0 + 0.05 * r  # large offset, tiny range
    elif p == 5:
        x = 1e-4 * r  # tiny
    elif p == 6:
        x = 300.0 * r  # beyond FP8's 448 in places
    elif p == 7:
        x = r.clone()
        x[0] = 20.0  # outlier on channel 0
    elif p == 8:
        x = r.clone()
        x[7] = -20.0  # outlier elsewhere
    elif p == 9:
        x = torch.round(r * 16) / 16  # on a grid: rounding ties
    elif p == 10:
        x = -5.0 - r.abs()  # all negative
    elif p == 11:
        x = r * (torch.rand(d, generator=g) < 0.1)  # sparse
    else:
        x = r * torch.exp(2 * torch.randn(d, generator=g))  # heavy-tailed channels
    return x


N_PATTERNS = 13


def make_kv(kind: str, a: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    """``[A, N, D]`` keys and values in ``dtype``: ``random`` (normal, channel
    scales in [0.5, 2]) or ``structured`` (every pattern of
    :func:`_structured_row`, cycled over (row, token))."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        if kind == "random":
            x = torch.randn(a, n, d, generator=g) * (0.5 + 1.5 * torch.rand(d, generator=g))
        else:
            x = torch.stack([torch.stack([_structured_row((i * n + j) % N_PATTERNS, d, g)
                                          for j in range(n)]) for i in range(a)])
        out.append(x.to(dtype))
    return out[0], out[1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention, fp32: q ``[Hq, D]`` over k, v ``[H, N, D]`` (GQA)."""
    rep = q.shape[0] // k.shape[0]
    k = k.float().repeat_interleave(rep, 0)
    v = v.float().repeat_interleave(rep, 0)
    s = torch.einsum("hd,hnd->hn", q.float(), k) * q.shape[-1] ** -0.5
    return torch.einsum("hn,hnd->hd", s.softmax(-1), v)


# --------------------------------------------------------------------------
# registry and bytes
# --------------------------------------------------------------------------
def test_registry():
    assert set(NAMES) >= {"fp8", "int8_per_token_head", "int4_per_token_head",
                          "turboquant_k8v4", "turboquant_4bit_nc"}
    assert set(baseline_names()) == set(NAMES)
    for name, form in FORMS.items():
        assert form.name == name and form.kind == "vllm"
        assert form.doc and form.paper and 0 < form.bits <= 8
        assert get_form(name) is form


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", NAMES)
def test_nbytes_matches_vllm_page_size(name, d):
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    if name == "fp8":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as backend
    elif name in PTH_NAMES:
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend as backend
    else:
        from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend as backend
    form = FORMS[name]
    for heads, block in ((1, 16), (8, 32)):
        # what Attention.get_kv_cache_spec builds, then the backend's packing
        spec = backend.customize_spec(FullAttentionSpec(
            block_size=block, num_kv_heads=heads, head_size=d,
            dtype=kv_cache_dtype_str_to_dtype(name, None),
            kv_quant_mode=get_kv_quant_mode(name)))
        assert spec.page_size_bytes == heads * form.nbytes(block, d)
    assert form.nbytes(7, d) == 7 * form.token_head_bytes(d)
    if name in TQ_NAMES:
        from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

        assert form.token_head_bytes(d) == TurboQuantConfig.from_cache_dtype(name, d).slot_size_aligned
    # the bytes pack() lays out are the bytes nbytes() counts
    k, v = make_kv("random", 2, 3, d, torch.bfloat16)
    assert form.pack(form.store(k, v)).shape == (2, 3, form.token_head_bytes(d))


def test_bytes_per_token_at_d64():
    per = {n: FORMS[n].token_head_bytes(64) for n in NAMES}
    assert per["fp8"] == 128
    assert per["int8_per_token_head"] == 136
    assert per["int4_per_token_head"] == 72
    assert per["turboquant_k8v4"] == 100
    assert per["turboquant_4bit_nc"] == 70
    assert per["turboquant_k3v4_nc"] == 62
    assert per["turboquant_3bit_nc"] == 54


def test_turboquant_skip_layers():
    assert TurboQuant.skip_layers(28) == [0, 1, 26, 27]
    assert TurboQuant.skip_layers(3) == [0, 2]
    assert TurboQuant.skip_layers(1) == []


# --------------------------------------------------------------------------
# vLLM's pure-torch helpers, bit for bit
# --------------------------------------------------------------------------
@pytest.mark.parametrize("d", [64, 128, 96])
def test_rht_matches_vllm(d):
    from vllm.v1.attention.ops.int4_per_token_head import _get_rht_signs, single_rht

    b = d & -d
    assert torch.equal(rht_signs(b), _get_rht_signs(b, 0, torch.device("cpu")))
    x = torch.randn(5, 3, d) * 3
    assert torch.equal(rht(x), single_rht(x))
    assert torch.equal(rht(x, inverse=True), single_rht(x, inverse=True))
    torch.testing.assert_close(rht(rht(x), inverse=True) / b, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("d", [64, 128])
def test_turboquant_rotation_and_codebook_match_vllm(d):
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.v1.attention.backends.turboquant_attn import _build_hadamard

    h = orthonormal_hadamard(d)
    assert torch.equal(h, _build_hadamard(d, "cpu"))
    torch.testing.assert_close(h @ h, torch.eye(d), rtol=0, atol=1e-6)
    for bits in (3, 4):
        assert torch.equal(lloyd_max_centroids(d, bits), get_centroids(d, bits))


# --------------------------------------------------------------------------
# fp8: the installed C++ CPU kernels
# --------------------------------------------------------------------------
def _cpu_fp8_ops():
    import vllm._custom_ops as ops

    if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
        pytest.skip("vLLM's CPU attention ops are not built in")
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("vLLM's CPU fp8 KV cache needs AVX-512 or AMX")
    return ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_fp8_codes_match_cpu_kernel(kind, dtype):
    ops = _cpu_fp8_ops()
    h, n, d, bs = 2, 45, 64, 32
    k, v = make_kv(kind, h, n, d, dtype, seed=3)
    k = k * 4  # reach the clamp and the subnormals
    nb = math.ceil(n / bs)
    cache = torch.zeros(nb, h, bs, 2 * d, dtype=torch.uint8)
    k_cache, v_cache = cache.view(nb, h, 2 * bs, d).chunk(2, dim=2)  # as the backend
    ops.cpu_attn_reshape_and_cache(k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
                                   k_cache, v_cache, torch.arange(n), "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="fp8")
    s = torch.arange(n)
    # ISA "vec": K column-major inside a (block, head) page, V row-major
    k_codes = k_cache.reshape(nb, h, d, bs)[s // bs, :, :, s % bs].transpose(0, 1)
    v_codes = v_cache[s // bs, :, s % bs, :].transpose(0, 1)
    st = FORMS["fp8"].store(k, v)
    assert torch.equal(st["k"], k_codes)
    assert torch.equal(st["v"], v_codes)
    # and it is truncation, not round-to-nearest
    rne = k.float().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert (rne != k_codes).float().mean() > 0.1


def test_fp8_cpu_attention_reads_our_roundtrip():
    ops = _cpu_fp8_ops()
    h, hq, n, d, bs = 2, 4, 45, 64, 32
    k, v = make_kv("random", h, n, d, torch.bfloat16, seed=4)
    k = k * 4
    nb = math.ceil(n / bs)
    cache = torch.zeros(nb, h, bs, 2 * d, dtype=torch.uint8)
    k_cache, v_cache = cache.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
                                   k_cache, v_cache, torch.arange(n), "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="fp8")
    q = torch.randn(1, hq, d).to(torch.bfloat16)
    i32 = dict(dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=hq, num_kv_heads=h, head_dim=d, seq_lens=torch.tensor([n], **i32),
        dtype=torch.bfloat16, query_start_loc=torch.tensor([0, 1], **i32), causal=True,
        sliding_window_size=-1, isa="vec", enable_kv_split=False, kv_cache_dtype="fp8")
    out = torch.zeros_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=k_cache, value_cache=v_cache, output=out,
        query_start_loc=torch.tensor([0, 1], **i32), seq_lens=torch.tensor([n], **i32),
        scale=d ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=torch.arange(nb, **i32)[None], softcap=0.0, scheduler_metadata=meta,
        s_aux=None, k_scale=1.0, v_scale=1.0, kv_cache_dtype="fp8")
    kr, vr = FORMS["fp8"].roundtrip(k, v)
    ours = _attend(q[0], kr, vr)
    assert (out[0].float() - ours).abs().max() <= 2 ** -7 * ours.abs().max()
    # the unquantized cache is measurably further away than bf16 output rounding
    assert (out[0].float() - _attend(q[0], k, v)).abs().max() > 4 * (out[0].float() - ours).abs().max()


# --------------------------------------------------------------------------
# error bounds (no vLLM needed)
# --------------------------------------------------------------------------
def _out_rounding(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of ``dtype`` at ``|x|``: what casting the output costs."""
    return 0.5 * torch.finfo(dtype).eps * x.float().abs() + 1e-30


def _check_fp8(form, x, xr, code):
    xf, got = x.float(), xr.float()
    inside = xf.abs() <= 448
    # truncation: the result never exceeds |x| and is less than one E4M3 step below
    e = torch.floor(torch.log2(xf.abs().clamp_min(2 ** -6)))
    step = 2.0 ** (e - 3)
    assert (got.abs() <= xf.abs() + 0.0)[inside].all()
    assert ((xf - got).abs() < step)[inside].all()
    assert (torch.sign(got) * torch.sign(xf) >= 0).all()
    assert torch.equal(got[~inside], xf[~inside].sign() * 448)


def _check_int8(st, x, xr, key):
    scale = st[f"{key}_scale"][..., None]
    err = (xr.float() - x.float()).abs()
    assert (err <= scale * (0.5 + 1e-5) + _out_rounding(xr, xr.dtype)).all()
    # the largest element gets code +-127, unless the 1e-6 floor on the scale bites
    floored = st[f"{key}_scale"] == torch.tensor(1e-6)
    assert ((st[key].float().abs().amax(-1) >= 126) | floored).all()


def _check_int4(st, x, xr, key):
    d = x.shape[-1]
    bits = st[f"{key}_scale"].view(torch.int32)
    scale = (bits & -16).view(torch.float32)  # rotated units
    xrot = rht(x.float()).to(x.dtype).float()
    lo, hi = xrot.amin(-1), xrot.amax(-1)
    # rows the clamped zero point can represent (the rotated vector straddles 0)
    ok = (lo <= 0.4 * scale) & (hi >= -0.4 * scale)
    err = (xr.float() - x.float()).norm(dim=-1)
    # the quantizer's error is at most scale/2 per rotated coordinate; the
    # rotation is sqrt(D) * orthonormal, so the L2 error is <= scale/2; plus
    # the model-dtype roundings of the rotated input and of the output
    eps = 0.5 * torch.finfo(x.dtype).eps
    bound = 0.5 * scale * (1 + 1e-4) + eps * (2 * x.float().norm(dim=-1) + scale * d ** 0.5) + 1e-6
    assert (err <= bound)[ok].all()


def _check_tq_values(form, st, x, xr):
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    levels = 2 ** form.value_bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    # scale and zero point are read back in fp16 (rel. error 2^-11 each)
    bound = (0.5 * scale * (1 + 1e-5) + 2 ** -11 * (levels * scale + lo.abs()) * 1.001
             + 6e-8 * levels + _out_rounding(xr, xr.dtype))
    assert ((xr.float() - xf).abs() <= bound).all()


def _check_tq_keys(form, st, x, xr, kind):
    xf = x.float()
    if form.key_fp8:
        inside = xf.abs() <= 448
        e = torch.floor(torch.log2(xf.abs().clamp_min(2 ** -6)))
        assert ((xr.float() - xf).abs() <= 2.0 ** (e - 4))[inside].all()  # half a step
        assert torch.equal(xr.float()[~inside], xf[~inside].sign() * 448)
        return
    norm = xf.norm(dim=-1)
    rel = (xr.float() - xf).norm(dim=-1) / norm.clamp_min(1e-30)
    if form.norm_correction:
        # reconstructed vectors carry exactly the stored (fp16) norm
        rn = form.load_rotated_keys(st).norm(dim=-1)
        assert torch.allclose(rn, st["k_norm"].float(), rtol=1e-5, atol=1e-30)
    # a unit vector's rotated coordinates are ~N(0, 1/D); Lloyd-Max MSE for
    # 4 (3) bits is ~0.0095 (0.035) per unit variance -> relative L2 error
    # ~0.1 (0.19).  A vector with a large mean is rotated into a spike on
    # coordinate 0 that the Gaussian codebook cannot hold (up to ~0.9, see
    # test_turboquant_mean_becomes_a_spike); norm correction still bounds it.
    limit = {4: 0.2, 3: 0.33}[form.key_bits] if kind == "random" else 1.0
    big = norm > 1e-3  # fp16 norms of tiny vectors underflow
    assert (rel <= limit)[big].all(), rel[big].max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_error_bounds(name, kind, n, d, dtype):
    form = FORMS[name]
    k, v = make_kv(kind, 3, n, d, dtype, seed=n + d)
    kr, vr = form.roundtrip(k, v)
    assert kr.shape == k.shape and vr.shape == v.shape
    assert kr.dtype == dtype and vr.dtype == dtype
    assert torch.isfinite(kr).all() and torch.isfinite(vr).all()
    st = form.store(k, v)
    if name == "fp8":
        _check_fp8(form, k, kr, st["k"])
        _check_fp8(form, v, vr, st["v"])
    elif name == "int8_per_token_head":
        _check_int8(st, k, kr, "k")
        _check_int8(st, v, vr, "v")
    elif name == "int4_per_token_head":
        _check_int4(st, k, kr, "k")
        _check_int4(st, v, vr, "v")
    else:
        _check_tq_keys(form, st, k, kr, kind)
        _check_tq_values(form, st, v, vr)
    # store -> load is what roundtrip returns
    k2, v2 = form.load(st, dtype)
    assert torch.equal(k2, kr) and torch.equal(v2, vr)


def test_fp8_satfinite_rounding():
    x = torch.tensor([1000.0, -1000.0, 449.0, 1.0625, 1.1875, -1.0625, 2 ** -9, 3 * 2 ** -10, 0.0])
    got = fp8_e4m3_decode(fp8_e4m3_satfinite(x))
    # saturate; ties to even (1.0625 -> 1.0, 1.1875 -> 1.25), also among subnormals
    assert got.tolist() == [448.0, -448.0, 448.0, 1.0, 1.25, -1.0, 2 ** -9, 2 ** -8, 0.0]


def test_fp8_cpu_truncates():
    form = FP8CPU()
    x = torch.tensor([[[1.1875, -1.1875, 500.0, -0.0, 2 ** -10, -(2 ** -10), 0.0039, 1e-30]]])
    st = form.store(x, x)
    kr, _ = form.load(st, torch.float32)
    assert kr[0, 0].tolist() == [1.125, -1.125, 448.0, 0.0, 0.0, 0.0, 0.001953125, 0.0]
    assert st["k"][0, 0, 3] == 0 and st["k"][0, 0, 5] == 0x80  # -0.0 -> +0, -tiny -> -0


def test_int4_loses_channel0_dominated_vectors():
    """The RHT maps channel 0 to a constant vector, whose clamped zero point
    cannot represent it: vLLM's int4_per_token_head reconstructs ~0."""
    form = Int4PerTokenHead()
    x = torch.zeros(1, 2, 64)
    x[0, 0, 0] = 3.0
    x[0, 1, 9] = 3.0  # any other channel is fine
    xr, _ = form.roundtrip(x, x)
    assert xr[0, 0].abs().max() < 1e-3
    assert (xr[0, 1] - x[0, 1]).abs().max() < 0.25  # 2.8 for 3: within scale/2 = 0.2 (+fp)


def test_turboquant_mean_becomes_a_spike():
    """TurboQuant rotates keys by a plain Hadamard matrix (no random signs), so
    a key's mean lands on rotated coordinate 0: a constant key loses ~35 % of
    its direction at 4 bits, a random one ~10 %."""
    form = FORMS["turboquant_4bit_nc"]
    x = torch.full((1, 1, 64), 0.7)
    xr, _ = form.roundtrip(x, x)
    rel = ((xr - x).norm() / x.norm()).item()
    assert 0.3 < rel < 0.4
    k, v = make_kv("random", 1, 64, 64, torch.float32)
    kr, _ = form.roundtrip(k, v)
    assert ((kr - k).norm(dim=-1) / k.norm(dim=-1)).mean() < 0.12


def test_roundtrip_rejects_bad_shapes():
    form = FORMS["int8_per_token_head"]
    with pytest.raises(ValueError):
        form.roundtrip(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        form.roundtrip(torch.zeros(1, 2, 8), torch.zeros(1, 3, 8))


# --------------------------------------------------------------------------
# Triton formats: vLLM's kernels under the Triton interpreter (subprocess)
# --------------------------------------------------------------------------
_KERNEL_SCRIPT = textwrap.dedent(r'''
    import math, os, sys, types
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    # vLLM's CPU build disables Triton unless Triton has a CPU backend; the
    # interpreter needs none, so register a stand-in before vLLM looks.
    from triton.backends import backends
    class _Driver:
        @staticmethod
        def is_active():
            return True
    backends.setdefault("cpu", types.SimpleNamespace(driver=_Driver))
    from vllm.triton_utils import HAS_TRITON
    assert HAS_TRITON
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
    from vllm.v1.attention.backends.turboquant_attn import _build_hadamard
    from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
        triton_reshape_and_cache_flash_per_token_head_quant)
    from vllm.v1.attention.ops.triton_turboquant_decode import (
        _tq_full_dequant_kv, triton_turboquant_decode_attention)
    from vllm.v1.attention.ops.triton_turboquant_store import triton_turboquant_store
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import get_kv_quant_mode
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    BS = int(sys.argv[3])
    I32 = dict(dtype=torch.int32)

    def per_token_head(job):
        name, k, v = job["name"], job["k"], job["v"]  # [N, H, D]
        n, h, d = k.shape
        mode = get_kv_quant_mode(name)
        data = d // 2 if "int4" in name else d
        nb = math.ceil(n / BS)
        # the real page: [block, head, slot, K data | K scale | V data | V scale]
        cache = torch.zeros(nb, h, BS, 2 * (data + 4), dtype=kv_cache_dtype_str_to_dtype(name, None))
        impl = types.SimpleNamespace(_k_scale_cache=None, _v_scale_cache=None)
        TritonAttentionImpl._ensure_scale_caches(impl, cache)
        kc, vc = cache.transpose(1, 2).split(data + 4, dim=-1)
        slots = torch.arange(n)
        triton_reshape_and_cache_flash_per_token_head_quant(
            k, v, kc, vc, impl._k_scale_cache, impl._v_scale_cache, slots, kv_quant_mode=mode)
        out = {"page": cache.view(torch.uint8)[slots // BS, :, slots % BS]}
        if "q" in job:
            q = job["q"]
            o = torch.zeros_like(q)
            unified_attention(
                q=q, k=kc, v=vc, out=o, cu_seqlens_q=torch.tensor([0, 1], **I32), max_seqlen_q=1,
                seqused_k=torch.tensor([n], **I32), max_seqlen_k=n, softmax_scale=d ** -0.5,
                causal=True, window_size=(-1, -1), block_table=torch.arange(nb, **I32)[None],
                softcap=0.0, q_descale=None, k_descale=None, v_descale=None, kv_quant_mode=mode,
                k_scale_cache=impl._k_scale_cache, v_scale_cache=impl._v_scale_cache)
            out["attn"] = o
        return out

    def turboquant(job):
        name, k, v = job["name"], job["k"], job["v"]
        n, h, d = k.shape
        cfg = TurboQuantConfig.from_cache_dtype(name, d)
        # TurboQuantAttentionImpl._ensure_on_device
        rot = _build_hadamard(d, "cpu")
        cents = get_centroids(d, cfg.centroid_bits)
        cs = cents.sort().values
        mids = (cs[:-1] + cs[1:]) / 2
        nb = math.ceil(n / BS)
        cache = torch.zeros(nb, BS, h, cfg.slot_size_aligned, dtype=torch.uint8)
        slots = torch.arange(n, **I32)
        triton_turboquant_store(k, v, cache, slots, rot, mids, mse_bits=cfg.key_mse_bits,
                                key_packed_size=cfg.key_packed_size,
                                value_quant_bits=cfg.value_quant_bits, key_fp8=cfg.key_fp8)
        s = slots.long()
        out = {"slot": cache[s // BS, s % BS]}
        bt = torch.arange(nb, **I32)[None]
        ko = torch.zeros(1, h, nb * BS, d, dtype=torch.float16)
        vo = torch.zeros_like(ko)
        _tq_full_dequant_kv[(n, h)](
            cache, bt, cents, ko, vo, ko.stride(0), ko.stride(1), ko.stride(2),
            vo.stride(0), vo.stride(1), vo.stride(2), cache.stride(0), cache.stride(1),
            cache.stride(2), bt.stride(0), HEAD_DIM=d, BLOCK_SIZE=BS, NUM_KV_HEADS=h,
            MSE_BYTES=d if cfg.key_fp8 else math.ceil(d * cfg.key_mse_bits / 8),
            KPS=cfg.key_packed_size, VQB=cfg.value_quant_bits,
            VAL_DATA_BYTES=math.ceil(d * cfg.value_quant_bits / 8), MSE_BITS=cfg.key_mse_bits,
            KEY_FP8=int(cfg.key_fp8), BLOCK_D=d, NORM_CORRECTION=int(cfg.norm_correction),
            FP8_E4B15=0)
        out["k_deq"] = ko[0, :, :n].transpose(0, 1)
        out["v_deq"] = vo[0, :, :n].transpose(0, 1)
        if "q" in job:
            out["attn"] = triton_turboquant_decode_attention(
                job["q"], cache, bt, torch.tensor([n], **I32), rot, cents, d ** -0.5,
                cfg.key_mse_bits, cfg.key_packed_size, cfg.value_quant_bits,
                key_fp8=cfg.key_fp8, norm_correction=cfg.norm_correction, PiT=rot,
                max_num_kv_splits=4)
        return out

    jobs = torch.load(sys.argv[1])
    results = {}
    for job in jobs:
        run = turboquant if job["name"].startswith("turboquant_") else per_token_head
        results[job["id"]] = run(job)
    torch.save(results, sys.argv[2])
''')

#: (kind, heads, tokens, head_dim, dtype) of the kernel comparisons
KERNEL_CASES = [
    ("random", 2, 7, 64, torch.bfloat16),
    ("random", 2, 33, 128, torch.float32),
    ("random", 3, 1, 128, torch.bfloat16),
    ("structured", 2, 17, 64, torch.bfloat16),
    ("structured", 2, 7, 128, torch.float32),
]
ATTN_CASE = 1  # the case whose attention kernels are run too
#: (form, case) pairs run through the kernels; the 3-bit presets share all
#: code paths but their packing with the others, so three cases suffice
_THREE_BIT = [n for n in TQ_NAMES if 3 in (FORMS[n].key_bits, FORMS[n].value_bits)]
KERNEL_JOBS = [(name, case) for name in PTH_NAMES + TQ_NAMES for case in range(len(KERNEL_CASES))
               if name not in _THREE_BIT or case in (0, ATTN_CASE, 3)]


def _kernel_inputs(name: str, case: int):
    kind, h, n, d, dtype = KERNEL_CASES[case]
    k, v = make_kv(kind, h, n, d, dtype, seed=10 + case)
    if name == "turboquant_k8v4":
        # The interpreter's fp32->fp8 conversion is not the GPU's (it rounds
        # ties up and mishandles carries and overflow), so hand it keys that
        # need no rounding; fp8_e4m3_satfinite's rounding is tested apart.
        k = fp8_e4m3_decode(fp8_e4m3_satfinite(k)).to(dtype)
    return k, v


_BACKGROUND: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _kernels_in_background(request, tmp_path_factory):
    """Start vLLM's kernels in a subprocess at the module's first test, so the
    interpreter runs while the in-process tests do (they come first)."""
    wanted = any("vllm_kernels" in item.fixturenames for item in request.session.items)
    if not wanted or importlib.util.find_spec("triton") is None:
        yield
        return
    tmp = tmp_path_factory.mktemp("vllm_kernels")
    jobs = []
    g = torch.Generator().manual_seed(99)
    for name, case in KERNEL_JOBS:
        k, v = _kernel_inputs(name, case)
        job = {"id": f"{name}/{case}", "name": name,
               "k": k.transpose(0, 1).contiguous(), "v": v.transpose(0, 1).contiguous()}
        if case == ATTN_CASE:
            # fp32 queries: the interpreter's int8 -> bf16 cast is broken
            job["q"] = torch.randn(1, 2 * k.shape[0], k.shape[-1], generator=g)
        jobs.append(job)
    torch.save(jobs, tmp / "jobs.pt")
    (tmp / "run_kernels.py").write_text(_KERNEL_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="1", VLLM_LOGGING_LEVEL="ERROR", OMP_NUM_THREADS="1")
    with open(tmp / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(tmp / "run_kernels.py"), str(tmp / "jobs.pt"),
                                 str(tmp / "out.pt"), str(BLOCK)],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    _BACKGROUND.update(proc=proc, tmp=tmp, jobs={j["id"]: j for j in jobs})
    yield
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def vllm_kernels():
    """Results of vLLM's Triton kernels on every (form, case), by job id."""
    if not _BACKGROUND:
        pytest.skip("triton is not installed")
    proc, tmp = _BACKGROUND["proc"], _BACKGROUND["tmp"]
    rc = proc.wait(timeout=300)
    assert rc == 0, (tmp / "stderr.txt").read_text()[-4000:]
    return {"jobs": _BACKGROUND["jobs"], "out": torch.load(tmp / "out.pt")}


@pytest.mark.parametrize("name,case", KERNEL_JOBS)
def test_cache_bytes_match_vllm_kernel(vllm_kernels, name, case):
    """The bytes vLLM's store kernel writes for each (token, head) are
    :meth:`pack` of :meth:`store`, bit for bit."""
    form = FORMS[name]
    k, v = _kernel_inputs(name, case)
    res = vllm_kernels["out"][f"{name}/{case}"]
    got = res["page" if name in PTH_NAMES else "slot"].transpose(0, 1)  # [H, N, bytes]
    ours = form.pack(form.store(k, v))
    assert got.shape == ours.shape
    diff = (got != ours).nonzero()
    assert diff.numel() == 0, f"{len(diff)} bytes differ, first at (head, token, byte) {diff[:5].tolist()}"


@pytest.mark.parametrize("name,case", [j for j in KERNEL_JOBS if j[0] in TQ_NAMES])
def test_turboquant_dequant_matches_vllm_kernel(vllm_kernels, name, case):
    """``_tq_full_dequant_kv`` (fp16, keys still rotated) against our load."""
    form = FORMS[name]
    k, v = _kernel_inputs(name, case)
    res = vllm_kernels["out"][f"{name}/{case}"]
    st = form.store(k, v)
    assert torch.equal(form.load_values(st).half(), res["v_deq"].transpose(0, 1))
    if form.key_fp8:
        assert torch.equal(fp8_e4m3_decode(st["k"]).half(), res["k_deq"].transpose(0, 1))
    else:
        # (the norm correction's sum(c^2) is reduced by numpy there and by
        # torch here; in another order it could move a last bit, but on these
        # inputs it does not)
        assert torch.equal(form.load_rotated_keys(st).half(), res["k_deq"].transpose(0, 1))


@pytest.mark.parametrize("name", PTH_NAMES + TQ_NAMES)
def test_attention_kernel_reads_our_roundtrip(vllm_kernels, name):
    """vLLM's attention kernel over its cache equals attention over the K/V
    :meth:`load` returns (fp32, so only summation order differs)."""
    form = FORMS[name]
    k, v = _kernel_inputs(name, ATTN_CASE)
    job = vllm_kernels["jobs"][f"{name}/{ATTN_CASE}"]
    got = vllm_kernels["out"][f"{name}/{ATTN_CASE}"]["attn"][0]
    kr, vr = form.load(form.store(k, v), torch.float32)
    ours = _attend(job["q"][0], kr, vr)
    tol = 1e-5 * ours.abs().max()
    assert (got - ours).abs().max() <= tol
    # a wrong reading (here: the unquantized K/V) is far outside that
    assert (got - _attend(job["q"][0], k, v)).abs().max() > 100 * tol
