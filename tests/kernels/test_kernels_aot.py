"""The Triton kernels compile for a Hopper GPU (sm_90) without one.

``vllm_kvshrink.kernels.aot`` records the host wrappers' launches (the GPU
configuration, on CPU tensors) and compiles them with Triton's NVIDIA backend;
``benchmarks/kernels/aot_check.py`` runs that over the benchmark's and awkward
shapes.  Here: that every case compiles without spills, that the
bandwidth-bound kernels use 128-bit accesses on the benchmark shapes, and that
the checks can fail (a strided layout is seen as narrow, a kernel the
interpreter would run but the compiler rejects is reported).

Compilation runs in child processes: once Triton's interpreter has run a
kernel in a process (``tests/kernels/test_kernels.py`` does), ``triton.language`` is
left patched there and the compiler fails on any kernel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from vllm_kvshrink.kernels import _launch, aot
from vllm_kvshrink.lab.kernels import ops as lab

ROOT = Path(__file__).resolve().parents[2]


def _nvidia_backend_usable() -> bool:
    if importlib.util.find_spec("triton.backends.nvidia") is None:
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


def _child(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_benchmark_and_awkward_shapes_compile_for_sm90(tmp_path):
    proc = _child(str(ROOT / "benchmarks" / "kernels" / "aot_check.py"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) >= 40 and not [r for r in rows if r["problems"]]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"compact_kernel", "quantize_kernel", "dequantize_kernel",
                       "merge_accumulate_kernel", "merge_finalize_kernel",
                       "window_stats_kernel", "window_scores_kernel", "pool_scores_kernel"}
    bench = [r for r in rows if r["case"].startswith("bench")]
    assert all(r["widest_load_bits"] == 128 and r["widest_store_bits"] == 128
               for r in bench if r["kernel"] == "compact_kernel")
    assert all(r["registers"] > 0 and r["spill_bytes"] == 0 for r in rows)  # cuobjdump read
    assert "| bench compaction in-place | sm_90 | compact_kernel |" in \
        (tmp_path / "table.md").read_text()


def test_recording_runs_nothing_and_uses_the_gpu_configuration():
    cache = torch.zeros(1, 4, 2, 16, 2, 64, dtype=torch.float16)
    before = cache.clone()
    table = torch.arange(2, dtype=torch.int32)
    idx = torch.arange(8, 0, -1, dtype=torch.int32).flip(0).expand(1, 2, 8).contiguous()
    cache.normal_()
    before = cache.clone()
    q = torch.randn(4, 4, 64, dtype=torch.float16)
    with aot.record_launches() as launches:
        lab.compact_kv(cache, table, idx, table[:1].clone(), "flash")
        lab.window_scores(q, cache[0], table, 20, "flash")
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


@triton.jit
def _non_power_of_two_range(out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, i)


def _compile_checks() -> dict:
    """Run in a child process: the compile-time facts the negative tests need."""
    x = torch.empty(2048, dtype=torch.float16)
    out = {}
    for stride in (1, 2):
        c = aot.compile_launch(_launch.Launch(_strided_copy, (1,), (x, x, stride), {"BLOCK": 1024}))
        out[f"stride{stride}"] = [c.widest_load_bits, c.widest_store_bits]
    try:
        aot.compile_launch(_launch.Launch(_non_power_of_two_range, (1,),
                                          (torch.empty(3, dtype=torch.int32),), {"BLOCK": 3}))
        out["rejected"] = None
    except Exception as e:
        out["rejected"] = str(e)
    return out


def test_the_checks_can_fail(aot_check):
    # The JIT turns a stride equal to 1 into a constant, which is what lets
    # the compiler vectorise; any other stride leaves 16-bit accesses.  A
    # kernel the interpreter would run but the compiler rejects is an error.
    proc = _child(__file__, "--compile-checks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["stride1"] == [128, 128] and facts["stride2"] == [16, 16]
    assert facts["rejected"] and "power of 2" in facts["rejected"].replace("power of two",
                                                                           "power of 2")
    row = dict(case="bench strided", kernel="compact_kernel", error=None, spill_bytes=0,
               widest_load_bits=16, widest_store_bits=16)
    assert aot_check.problems(row) == ["widest global ld is 16 bit, not 128",
                                       "widest global st is 16 bit, not 128"]
    assert aot_check.problems(dict(row, error="CompilationError: x")) == ["does not compile"]
    assert aot_check.problems(dict(row, case="awkward", spill_bytes=8)) == ["spills 8 B"]
    assert aot.widest_access("ld.global.v4.b32 {%r1}, [%rd1];\n@%p1 st.global.b16 [%rd2], %rs1;") \
        == {"ld": 128, "st": 16}


if __name__ == "__main__" and sys.argv[1:] == ["--compile-checks"]:
    print(json.dumps(_compile_checks()))
