"""The C++ CPU library: building and loading it, and the quantizer's binding.

``csrc/cpu`` (packed attention, unpack and the quantizer) is built
together with torch's extension machinery into one library registering
``torch.ops.kvshrink_cpu.*``.  ``make install`` builds it once (``python -m
vllm_kvshrink.kernels.cpu_ext build``) into a directory that depends on the
torch version and the CPU (it is compiled with ``-march=native``), so later
processes only load it.  Where the sources are missing (a non-editable
install) or the compiler fails, :func:`load` returns ``False``,
:func:`unavailable_reason` says why, and callers use the PyTorch reference.

This module imports nothing of the package, so the quantizer
(:mod:`.quant`) can reach its C++ twin (:func:`quantize`) without an import
cycle; the other kernels' wrappers are :mod:`.cpu_ext`'s.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
SOURCES = ("packed_attention.cpp", "unpack.cpp", "quantize.cpp")
NAME = "kvshrink_cpu"
_NATIVE = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
_PORTABLE = ["-O3", "-ffp-contract=fast", "-fopenmp"]
_STATE: dict[str, object] = {}


def _cpu_tag() -> str:
    """Machine and a hash of the CPU's feature flags: a library built with
    ``-march=native`` is reused only on a CPU like the one that built it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:10]}"


def build_dir() -> Path:
    """Where the library is built: ``$TORCH_EXTENSIONS_DIR/kvshrink_cpu-<cpu>``
    if set, else ``~/.cache/vllm_kvshrink/torch_extensions/<torch>/kvshrink_cpu-<cpu>``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = (Path(root) if root else Path.home() / ".cache" / "vllm_kvshrink" /
            "torch_extensions" / torch.__version__.replace("+", "_"))
    return base / f"{NAME}-{_cpu_tag()}"


def build(verbose: bool = False) -> str:
    """Compile (or find already compiled) and load the library, registering
    ``torch.ops.kvshrink_cpu.packed_attention``.  Returns the library's path;
    raises when the sources are missing or the compiler fails."""
    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(f"the sources of the kvshrink CPU kernel are missing from {CSRC} "
                           f"({', '.join(missing)}); it needs an editable install")
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in (_NATIVE, _PORTABLE):  # -march=native is not known everywhere
        try:
            cpp_extension.load(
                name=NAME,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(out),
                is_python_module=False,
                verbose=verbose,
            )
            _STATE["flags"] = " ".join(flags)
            if errors:  # built, but without the CPU's vector units: say so, loudly
                import warnings

                warnings.warn(f"the kvshrink CPU kernel was built without -march=native "
                              f"({errors[0]}); it runs without AVX2/AVX-512 and is several "
                              f"times slower. Fix the compiler error or report it.",
                              RuntimeWarning, stacklevel=2)
            return str(out / f"{NAME}.so")
        except Exception as e:  # noqa: BLE001 - compiler errors come in many types
            msg = str(e).strip().splitlines()
            errors.append(f"{' '.join(flags)}: {_first_error(str(e)) or msg[-1:] or e}")
    raise RuntimeError("building the kvshrink CPU kernel failed: " + "; ".join(errors))


def _first_error(log: str) -> str | None:
    """The compiler's first ``error:`` line in a build log, if any."""
    for line in log.splitlines():
        if "error:" in line:
            return line.strip()
    return None


def build_flags() -> str | None:
    """The compiler flags of the library this process loaded (``None``
    before :func:`load`, or when it could not be built): ``-march=native``
    unless that failed here (:func:`build` warns then)."""
    return _STATE.get("flags")  # type: ignore[return-value]


def load(verbose: bool = False) -> bool:
    """Build (once per process, cached across processes) and load the kernel;
    ``False`` when it cannot be built here (see :func:`unavailable_reason`)."""
    if "loaded" in _STATE:
        return bool(_STATE["loaded"])
    try:
        _STATE["path"] = build(verbose=verbose)
        _STATE["loaded"] = True
    except Exception as e:  # noqa: BLE001 - any failure means: use the reference
        _STATE["reason"] = str(e)
        _STATE["loaded"] = False
    return bool(_STATE["loaded"])


def available() -> bool:
    """Whether the kernel is built and loaded here (building it if needed)."""
    return load()


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``False`` (``None`` if it did not, or was not
    called yet)."""
    return _STATE.get("reason")  # type: ignore[return-value]


def quantize(x: torch.Tensor, bits: int, group_size: int, param_dtype: torch.dtype):
    """The quantizer (:func:`~vllm_kvshrink.kernels.reference.quantize_ref` on
    ``x`` ``[A, R, C]``, checked by the caller) in C++, bit for bit the same;
    ``None`` where it does not apply (not a CPU tensor, parameters not bf16,
    the kernel not built), for the caller's reference."""
    if x.device.type != "cpu" or param_dtype != torch.bfloat16 or not load():
        return None
    a, r, c = x.shape
    m = a * r * (c // group_size)
    packed = torch.empty(a, r, c * bits // 8, dtype=torch.uint8)
    scale = torch.empty(a, r, c // group_size, dtype=torch.bfloat16)
    zero = torch.empty_like(scale)
    if m:
        torch.ops.kvshrink_cpu.quantize_groups(
            packed.view(m, -1), scale, zero, x.float().contiguous().view(m, group_size), bits)
    return packed, scale, zero


def roundtrip(x: torch.Tensor, bits: int, group_size: int):
    """``x`` ``[A, R, C]`` quantized with bf16 parameters and dequantized to
    float32 in one pass (what :func:`quantize` then the reference's
    ``dequantize_ref`` give, bit for bit, without forming the codes);
    ``None`` where it does not apply (not a CPU tensor, the kernel not
    built), for the caller's two-step path."""
    if x.device.type != "cpu" or not load():
        return None
    a, r, c = x.shape
    m = a * r * (c // group_size)
    out = torch.empty(a, r, c, dtype=torch.float32)
    if m:
        torch.ops.kvshrink_cpu.roundtrip_groups(
            out.view(m, group_size), x.float().contiguous().view(m, group_size), bits)
    return out


def hadamard_rows(x: torch.Tensor):
    """Each row of ``x`` ``[..., D]`` Hadamard-rotated, float32, by the
    kernels' own rotation (a fast Walsh-Hadamard transform, ``O(D log D)``
    per row); ``None`` where it does not apply (not a CPU tensor, ``D`` not a
    power of two from 16 to 1024, the kernel not built), for the caller's
    matrix product."""
    d = x.shape[-1]
    if x.device.type != "cpu" or not (16 <= d <= 1024) or d & (d - 1) or not load():
        return None
    out = torch.empty(x.shape, dtype=torch.float32)
    if out.numel():
        src = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        torch.ops.kvshrink_cpu.hadamard_rows(out.view(-1, d), src.contiguous().view(-1, d))
    return out
