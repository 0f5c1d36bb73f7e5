"""The CUDA sources in csrc/ compile with this machine's toolchain.

There is no GPU here and torch is a CPU build, so the extension cannot be
built or run (the GPU script ``benchmarks/kernels/run_all.py`` does both);
what can be checked is that ``nvcc`` compiles the kernels (one arch, to keep
it fast) and that the torch binding is valid C++ against this torch's headers.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).exists()), None)
CUDA_INCLUDE = next((p for p in (Path(NVCC).resolve().parents[1] / "include" if NVCC else None,
                                 Path("/usr/local/cuda/include")) if p and (p / "cuda_runtime.h").exists()),
                    None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernels_compile_with_nvcc(tmp_path):
    cmd = [NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O2", "-Xcompiler", "-Wall",
           str(CSRC / "kvshrink_kernels.cu"), "-o", str(tmp_path / "kvshrink_kernels.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "kvshrink_kernels.o").stat().st_size > 0
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


@pytest.mark.skipif(CUDA_INCLUDE is None or shutil.which("g++") is None,
                    reason="CUDA headers or g++ not found")
def test_torch_binding_is_valid_cpp(tmp_path):
    from torch.utils.cpp_extension import include_paths

    # The CPU wheel of torch ships c10/cuda headers but not the one generated
    # at CUDA build time; its only content is this macro.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", f"-I{tmp_path}", f"-I{CUDA_INCLUDE}",
           f"-I{CSRC}"] + [f"-I{p}" for p in include_paths()] + [str(CSRC / "kvshrink_ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_extension_is_optional_without_cuda():
    from vllm_kvshrink.kernels import cuda_ext

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cuda_ext.available() is False and cuda_ext.load() is False
    with pytest.raises(RuntimeError, match="CUDA extension is not available"):
        cuda_ext.quantize(torch.randn(1, 4, 8), 4, 8)


def test_build_says_why_it_cannot_build_here():
    from vllm_kvshrink.kernels import cuda_ext

    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here")
    assert cuda_ext.buildable() is False
    with pytest.raises(RuntimeError, match=r"torch .* has no CUDA"):
        cuda_ext.build("9.0")


@pytest.mark.skipif(torch.version.cuda is None or NVCC is None,
                    reason="needs a CUDA build of torch and nvcc (no GPU needed)")
def test_extension_builds_links_and_registers_without_a_gpu(tmp_path):
    """With a CUDA torch (e.g. the GPU machine's torch 2.11+cu130 installed on
    a CPU machine) the full build -- nvcc, the binding, the link against
    libtorch_cuda -- works for sm_90 and registers the ops."""
    from vllm_kvshrink.kernels import cuda_ext

    path = cuda_ext.build("9.0", build_dir=str(tmp_path))
    assert Path(path).is_file()
    schemas = {op: str(getattr(torch.ops.kvshrink_cuda, op).default._schema)
               for op in ("compact_kv", "quantize", "dequantize")}
    assert "bool staged" in schemas["compact_kv"]
    assert "ScalarType param_dtype" in schemas["quantize"]
    assert "bool channel" in schemas["dequantize"]
