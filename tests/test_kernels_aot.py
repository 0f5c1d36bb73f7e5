"""The Triton kernels compile for a Hopper GPU (sm_90) without one.

``vllm_kvshrink.kernels.aot`` records the host wrappers' launches (the GPU
configuration, on CPU tensors) and compiles them with Triton's NVIDIA backend;
``benchmarks/kernels/aot_check.py`` runs that over the benchmark's and awkward
shapes.  Here: that every case compiles without spills, that the
bandwidth-bound kernels use 128-bit accesses on the benchmark shapes, and that
the checks can fail (a strided layout is seen as narrow, a kernel the
interpreter would run but the compiler rejects is reported).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from vllm_kvshrink import kernels as K
from vllm_kvshrink.kernels import _launch, aot

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend_usable() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return aot._tool("ptxas") is not None


pytestmark = pytest.mark.skipif(not _nvidia_backend_usable(),
                                reason="Triton's NVIDIA backend (ptxas) is not installed")


@pytest.fixture(scope="module")
def aot_check():
    path = ROOT / "benchmarks" / "kernels" / "aot_check.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("aot_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_and_awkward_shapes_compile_for_sm90(aot_check):
    rows = aot_check.run(aot_check.benchmark_cases() + aot_check.awkward_cases(), [90],
                         log=lambda s: None)
    failed = [(r["case"], r["kernel"], r["problems"]) for r in rows if r["problems"]]
    assert not failed, failed
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"compact_kernel", "quantize_kernel", "dequantize_kernel",
                       "merge_accumulate_kernel", "merge_finalize_kernel",
                       "window_stats_kernel", "window_scores_kernel"}
    bench = [r for r in rows if r["case"].startswith("bench")]
    assert all(r["widest_load_bits"] == 128 and r["widest_store_bits"] == 128
               for r in bench if r["kernel"] == "compact_kernel")
    assert all(r["registers"] > 0 for r in rows)  # cuobjdump was read


def test_recording_runs_nothing_and_uses_the_gpu_configuration():
    cache = torch.zeros(1, 4, 2, 16, 2, 64, dtype=torch.float16)
    before = cache.clone()
    table = torch.arange(2, dtype=torch.int32)
    idx = torch.arange(8, 0, -1, dtype=torch.int32).flip(0).expand(1, 2, 8).contiguous()
    cache.normal_()
    before = cache.clone()
    q = torch.randn(4, 4, 64, dtype=torch.float16)
    with aot.record_launches() as launches:
        K.compact_kv(cache, table, idx, table[:1].clone(), "flash")
        K.window_scores(q, cache[0], table, 20, "flash")
    assert not _launch.recording()
    assert torch.equal(cache, before)  # nothing ran
    names = [launch.kernel.__name__ for launch in launches]
    assert names == ["compact_kernel", "window_stats_kernel", "window_scores_kernel"]
    assert launches[1].kwargs["BLOCK_N"] == 64  # the CUDA block, not the interpreter's 16
    assert launches[1].kwargs["UPCAST"] is False


@triton.jit
def _strided_copy(src, dst, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst + i * stride, tl.load(src + i * stride))


def test_narrow_accesses_are_seen(aot_check):
    # The JIT turns a stride equal to 1 into a constant, which is what lets
    # the compiler vectorise; any other stride leaves 16-bit accesses.
    x = torch.empty(2048, dtype=torch.float16)
    wide = aot.compile_launch(_launch.Launch(_strided_copy, (1,), (x, x, 1), {"BLOCK": 1024}))
    narrow = aot.compile_launch(_launch.Launch(_strided_copy, (1,), (x, x, 2), {"BLOCK": 1024}))
    assert (wide.widest_load_bits, wide.widest_store_bits) == (128, 128)
    assert (narrow.widest_load_bits, narrow.widest_store_bits) == (16, 16)
    row = dict(case="bench strided", kernel="compact_kernel", error=None, spill_bytes=0,
               widest_load_bits=narrow.widest_load_bits,
               widest_store_bits=narrow.widest_store_bits)
    assert aot_check.problems(row) == ["widest global ld is 16 bit, not 128",
                                       "widest global st is 16 bit, not 128"]


@triton.jit
def _non_power_of_two_range(out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, i)


def test_a_kernel_the_compiler_rejects_is_reported(aot_check):
    launch = _launch.Launch(_non_power_of_two_range, (1,), (torch.empty(3, dtype=torch.int32),),
                            {"BLOCK": 3})
    with pytest.raises(Exception, match="power of 2|power of two"):
        aot.compile_launch(launch, 90)
    assert aot.widest_access("ld.global.v4.b32 {%r1}, [%rd1];\n@%p1 st.global.b16 [%rd2], %rs1;") \
        == {"ld": 128, "st": 16}
