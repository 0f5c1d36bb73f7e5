"""The CUDA sources in csrc/ (the lab's CUDA compaction and quantization,
``lab.kernels.cuda_ext``) compile with this machine's toolchain.

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

CSRC = Path(__file__).resolve().parents[2] / "csrc"
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
    from vllm_kvshrink.lab.kernels import cuda_ext

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cuda_ext.available() is False and cuda_ext.load() is False
    with pytest.raises(RuntimeError, match="CUDA extension is not available"):
        cuda_ext.quantize(torch.randn(1, 4, 8), 4, 8)


def test_build_says_why_it_cannot_build_here():
    from vllm_kvshrink.lab.kernels import cuda_ext

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
    from vllm_kvshrink.lab.kernels import cuda_ext

    path = cuda_ext.build("9.0", build_dir=str(tmp_path))
    assert Path(path).is_file()
    schemas = {op: str(getattr(torch.ops.kvshrink_cuda, op).default._schema)
               for op in ("compact_kv", "quantize", "dequantize")}
    assert "bool staged" in schemas["compact_kv"]
    assert "ScalarType param_dtype" in schemas["quantize"]
    assert "bool channel" in schemas["dequantize"]


# --------------------------------------------------------------------------
# the vector quantization kernels' per-lane code, run on the CPU
# --------------------------------------------------------------------------
_TYPE_IDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def quant_vector_host(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    exe = tmp_path_factory.mktemp("cuda") / "quant_vector_host"
    cmd = [NVCC, "-std=c++17", "-O2", "-Xcompiler", "-Wall,-ffp-contract=off", f"-I{CSRC}",
           str(Path(__file__).parent / "cuda" / "quant_vector_host.cu"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
    return exe


def _run_host(exe, x, bits, group_size, param_dtype):
    import numpy as np

    a, r, c = x.shape
    header = np.array([_TYPE_IDS[x.dtype], _TYPE_IDS[param_dtype], bits, a, r, c, group_size],
                      dtype=np.int32).tobytes()
    raw = x.contiguous().view(torch.uint8).numpy().tobytes()
    proc = subprocess.run([str(exe)], input=header + raw, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.returncode
    buf = torch.frombuffer(bytearray(proc.stdout), dtype=torch.uint8)
    n_units = a * r * (c // group_size)
    sizes = [a * r * c * bits // 8, n_units * param_dtype.itemsize,
             n_units * param_dtype.itemsize, a * r * c * x.element_size()]
    assert buf.numel() == sum(sizes)
    packed, scale, zero, out = torch.split(buf, sizes)
    return (packed.view(a, r, c * bits // 8), scale.view(param_dtype).view(a, r, -1),
            zero.view(param_dtype).view(a, r, -1), out.view(x.dtype).view(a, r, c))


VECTOR_CASES = [  # dtype, param dtype, shape, group size (16 bytes * 1..32 lanes)
    (torch.float16, torch.float16, (3, 5, 128), 32),
    (torch.bfloat16, torch.bfloat16, (2, 7, 64), 8),
    (torch.float32, torch.float32, (2, 3, 96), 4),
    (torch.float16, torch.float32, (1, 4, 512), 256),
    (torch.float32, torch.bfloat16, (4, 2, 256), 128),
]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype,param_dtype,shape,group_size", VECTOR_CASES)
def test_vector_quantization_lane_code_matches_reference(quant_vector_host, bits, dtype,
                                                         param_dtype, shape, group_size):
    from vllm_kvshrink.kernels import reference as ref

    g = torch.Generator().manual_seed(bits * 7 + group_size)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x[0, 0, :group_size] = 1.5  # a constant group: scale 0 -> 1
    packed, scale, zero, out = _run_host(quant_vector_host, x, bits, group_size, param_dtype)
    exp = ref.quantize_ref(x, bits, group_size, param_dtype)
    assert torch.equal(packed, exp[0])
    assert torch.equal(scale, exp[1]) and torch.equal(zero, exp[2])
    # multiply then add, unfused: the reference's bits
    assert torch.equal(out, ref.dequantize_ref(*exp, bits, group_size, dtype))
