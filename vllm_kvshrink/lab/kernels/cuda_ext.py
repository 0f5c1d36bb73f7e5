"""The CUDA versions of compaction and quantization (``csrc/``), built with
torch's extension machinery on first use where torch has CUDA.

Without CUDA (or without the ``csrc/`` sources, e.g. a non-editable install)
:func:`load` returns ``None`` and the Triton / PyTorch ops are used; nothing
here is needed for the package to work.  The wrappers take the same
arguments as their twins (compaction: :mod:`.ops`; quantization:
:mod:`vllm_kvshrink.kernels.quant`) and check them the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vllm_kvshrink.kernels import quant
from vllm_kvshrink.kernels.layouts import kv_views
from vllm_kvshrink.lab.kernels import ops

CSRC = Path(__file__).resolve().parents[3] / "csrc"
SOURCES = ("kvshrink_ops.cpp", "kvshrink_kernels.cu")
_STATE: dict[str, object] = {}


def _missing() -> list[str]:
    """What building the extension here lacks (empty: it can be built)."""
    missing = [] if torch.version.cuda is not None else [
        f"a CUDA build of torch (torch {torch.__version__} has no CUDA)"]
    if not all((CSRC / s).is_file() for s in SOURCES):
        missing.append(f"the sources in {CSRC}")
    return missing


def buildable() -> bool:
    """Whether the extension can be compiled here: a CUDA build of torch and
    the sources (no GPU needed; ``nvcc`` is found by torch)."""
    return not _missing()


def available() -> bool:
    """Whether the extension can be built and run here (also needs a GPU)."""
    return buildable() and torch.cuda.is_available()


def _fix_cuda_home(cpp_extension) -> None:
    """torch takes the toolkit to be the folder above the ``nvcc`` on the
    PATH; where that ``nvcc`` is a wrapper script elsewhere (``/usr/local/bin``)
    the headers are not there.  Then use ``/usr/local/cuda`` if it has them; an
    explicit ``CUDA_HOME`` is always left alone."""
    home = cpp_extension.CUDA_HOME
    if os.environ.get("CUDA_HOME") or (home and (Path(home) / "include" /
                                                 "cuda_runtime_api.h").is_file()):
        return
    fallback = Path("/usr/local/cuda")
    if (fallback / "include" / "cuda_runtime_api.h").is_file():
        cpp_extension.CUDA_HOME = str(fallback)
        os.environ["CUDA_HOME"] = str(fallback)


def build(arch_list: str | None = None, verbose: bool = False, build_dir: str | None = None):
    """Compile (cached by torch under ``TORCH_EXTENSIONS_DIR``, or in
    ``build_dir``) and load the extension, registering
    ``torch.ops.kvshrink_cuda.*``.  Needs a CUDA build of torch and ``nvcc``,
    not a GPU: ``arch_list`` (``TORCH_CUDA_ARCH_LIST`` syntax, e.g. ``"9.0"``)
    must then be given.  Returns the path of the built library."""
    missing = _missing()
    if missing:
        raise RuntimeError("cannot build the kvshrink CUDA extension here: it needs "
                           + " and ".join(missing))
    from torch.utils import cpp_extension

    _fix_cuda_home(cpp_extension)
    if arch_list is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if not torch.cuda.is_available():
            raise ValueError("arch_list is required without a GPU (e.g. '9.0' for H100/H200)")
        major, minor = torch.cuda.get_device_capability()
        arch_list = f"{major}.{minor}"  # only the local device: a fast build
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        path = cpp_extension.load(
            name="kvshrink_cuda",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
            build_directory=build_dir,
            verbose=verbose,
        )
    finally:
        if arch_list is not None:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    return path


def load(verbose: bool = False) -> bool:
    """Build and load the extension once, for the local GPU; ``False`` when it
    is not available here.  A build error propagates: a CUDA machine that
    cannot compile the sources should say so."""
    if "loaded" in _STATE:
        return bool(_STATE["loaded"])
    if not available():
        _STATE["loaded"] = False
        return False
    build(verbose=verbose)
    _STATE["loaded"] = True
    return True


def _require() -> None:
    if not load():
        raise RuntimeError(
            "the kvshrink CUDA extension is not available here (needs CUDA torch, a GPU "
            f"and the sources in {CSRC}); use the Triton ops instead"
        )


def compact_kv(
    cache: torch.Tensor,
    src_table: torch.Tensor,
    src_index: torch.Tensor,
    dst_table: torch.Tensor,
    layout: str,
    staged: bool = False,
) -> None:
    """CUDA twin of :func:`vllm_kvshrink.lab.kernels.ops.compact_kv` (stacked
    cache ``[L, ...]`` in ``layout``, ``src_index [L, H, K]``)."""
    ops._check_compact(cache, src_table, src_index, dst_table, layout, staged=staged)
    _require()
    raw = cache.view(ops._RAW[cache.element_size()])
    k, v = kv_views(raw, layout)
    idx_dtype = src_index.dtype
    torch.ops.kvshrink_cuda.compact_kv(
        k, v, src_table.to(idx_dtype).contiguous(), src_index,
        dst_table.to(idx_dtype).contiguous(), staged)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: str = "token",
    param_dtype: torch.dtype | None = None,
) -> quant.Quantized:
    """CUDA twin of :func:`vllm_kvshrink.kernels.quant.quantize` (bit-exact
    with it): ``x [..., N, D]`` -> codes and parameters as there."""
    quant.check_choice("axis", axis, quant.AXES)
    x3 = quant._as_3d(x, "x")
    if axis == "channel":
        x3 = x3.transpose(1, 2)
    pdt = x.dtype if param_dtype is None else param_dtype
    quant._check_quantize(x3, bits, group_size, pdt)
    _require()
    return quant.Quantized(*torch.ops.kvshrink_cuda.quantize(x3, bits, group_size, pdt))


def dequantize(
    q: quant.Quantized,
    bits: int,
    group_size: int,
    axis: str = "token",
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """CUDA twin of :func:`vllm_kvshrink.kernels.quant.dequantize`: ``[A, N, D]``
    in ``dtype``."""
    quant.check_choice("axis", axis, quant.AXES)
    quant._check_dequantize(q.packed, q.scale, q.zero, bits, group_size, dtype)
    _require()
    return torch.ops.kvshrink_cuda.dequantize(
        q.packed, q.scale, q.zero, bits, group_size, dtype, axis == "channel")
