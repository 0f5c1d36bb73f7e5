"""Ahead-of-time compilation of the Triton kernels for an NVIDIA GPU on a
machine that has none.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but
not that they compile: the compiler rejects things the interpreter runs
(non-power-of-two ranges, mixed-type branches, ...), and only the compiled
code says whether the loads are vectorised, how many registers a program
needs and whether it spills.  Triton's NVIDIA backend (``ptxas`` ships in the
wheel) compiles to a cubin for any ``sm_XY`` without a driver, so this is
checked here:

1. :func:`record_launches` runs the host wrappers (the quantizer, the lab ops) on CPU
   tensors with the *GPU* configuration (block sizes as on CUDA) and records
   each launch (kernel, grid, arguments) instead of running it;
2. :func:`compile_launch` turns one launch into Triton's ``ASTSource`` (the
   argument types and the 16-divisibility hints the JIT would derive from the
   same values) and compiles it for the target, returning what the cubin
   holds: registers, spills, shared memory and the widest global load/store.

``benchmarks/kernels/aot_check.py`` drives it over the benchmark's shapes and
the awkward ones; ``tests/kernels/test_kernels_aot.py`` runs a subset in CI.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from vllm_kvshrink.kernels import _launch

_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
    torch.float64: "fp64", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1",
    torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5",
}


@contextlib.contextmanager
def record_launches():
    """Within the block, the ops record their Triton launches (into the list
    yielded) for the GPU configuration, and run nothing: their outputs are
    uninitialised."""
    prev = _launch._RECORD
    _launch._RECORD = []
    try:
        yield _launch._RECORD
    finally:
        _launch._RECORD = prev


def _jit_function(kernel) -> triton.runtime.jit.JITFunction:
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    return triton.runtime.jit.JITFunction(kernel.fn)  # an interpreter wrapper


def _specialize(fn, i: int, value) -> tuple[str, object]:
    """``(type, key)`` as Triton's JIT specialises argument ``i`` of ``fn`` on
    ``value``: an int equal to 1 becomes the constant 1, and pointers / ints
    divisible by 16 get the key ``"D"`` (a divisibility hint, which is what
    lets the compiler vectorise)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    if isinstance(value, torch.Tensor) and value.dtype not in _TYPES:
        raise TypeError(f"{fn.__name__}: argument {fn.arg_names[i]} has dtype {value.dtype}, "
                        f"which has no Triton pointer type")
    p = fn.params[i]
    specialize = i not in getattr(fn, "do_not_specialize", ())
    align = i not in getattr(fn, "do_not_specialize_on_alignment", ())
    return native_specialize_impl(CUDABackend, value, p.is_const, specialize, align)[:2]


@dataclass
class Compiled:
    """What one compiled launch holds (per program: registers are per thread)."""

    kernel: str
    arch: int
    constexprs: dict
    num_warps: int
    grid: tuple
    registers: int
    spill_bytes: int  # local memory per thread: register spills, 0 is the goal
    shared_bytes: int
    widest_load_bits: int  # widest global load instruction in the PTX (128 = v4.b32)
    widest_store_bits: int
    seconds: float

    def row(self) -> dict:
        return asdict(self)


def source_of(launch: _launch.Launch):
    """``(ASTSource, options, constexprs)`` for one recorded launch: the
    source to compile, the launch options (``num_warps``, ...) and the
    kernel's declared ``tl.constexpr`` values (for the report)."""
    from triton.compiler import ASTSource

    fn = _jit_function(launch.kernel)
    names = fn.arg_names
    bound = dict(zip(names, launch.args))
    options = {}
    for k, v in launch.kwargs.items():
        if k in names:
            bound[k] = v
        else:  # num_warps, num_stages, ...
            options[k] = v
    signature, constexprs, specialised, attrs = {}, {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in bound:
            default = getattr(p, "default", inspect.Parameter.empty)
            if default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: argument {p.name} missing from the launch")
            bound[p.name] = default
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ty, key = _specialize(fn, i, value)
        signature[p.name] = ty
        if ty == "constexpr":  # an int equal to 1
            specialised[p.name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs={**constexprs, **specialised}, attrs=attrs)
    return src, options, constexprs


def _tool(name: str) -> str | None:
    import triton.backends.nvidia as nv

    bundled = Path(nv.__file__).parent / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def resource_usage(cubin: bytes, kernel: str) -> dict:
    """``REG``, ``LOCAL`` (spills) and ``SHARED`` of ``kernel`` in a cubin,
    read by ``cuobjdump --dump-resource-usage`` (bundled with Triton)."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{kernel}.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, timeout=120).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key] = int(m.group(1))
    return usage


_VEC = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def widest_access(ptx: str) -> dict[str, int]:
    """Widest global load and store of a PTX listing, in bits (vector count x
    element width)."""
    widest = {"ld": 0, "st": 0}
    for op, vec, bits in _VEC.findall(ptx):
        widest[op] = max(widest[op], int(vec or 1) * int(bits))
    return widest


def compile_launch(launch: _launch.Launch, arch: int = 90) -> Compiled:
    """Compile one recorded launch for ``sm_<arch>`` (no GPU needed)."""
    from triton.backends.compiler import GPUTarget

    src, options, constexprs = source_of(launch)
    t = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - t
    name = compiled.metadata.name
    usage = resource_usage(compiled.asm["cubin"], name)
    access = widest_access(compiled.asm["ptx"])
    return Compiled(
        kernel=name, arch=arch, constexprs=constexprs,
        num_warps=int(compiled.metadata.num_warps), grid=launch.grid,
        registers=usage.get("REG", -1), spill_bytes=usage.get("LOCAL", -1),
        shared_bytes=int(compiled.metadata.shared), widest_load_bits=access["ld"],
        widest_store_bits=access["st"], seconds=seconds,
    )


def distinct(launches: list[_launch.Launch]) -> list[_launch.Launch]:
    """One launch per distinct compilation (kernel, argument types, constants,
    hints, options): what Triton's JIT cache would compile."""
    seen, out = set(), []
    for launch in launches:
        src, options, _ = source_of(launch)
        key = (src.name, tuple(src.signature.items()), tuple(sorted(map(str, src.constants.items()))),
               tuple(sorted(src.attrs)), tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out
