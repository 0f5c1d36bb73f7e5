"""What machine a figure was measured on."""

from __future__ import annotations

from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where it is not there;
    platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def fp8_kv_unavailable() -> str | None:
    """Why vLLM's CPU backend cannot hold an fp8 KV cache here, or ``None``
    where it can: vLLM 0.32 refuses ``kv_cache_dtype=fp8`` on an x86 CPU with
    neither AVX-512 nor AMX (``cpu_attn._get_attn_isa``).  The benchmarks
    leave their stock fp8 run out on such a CPU and say so."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    if torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return ("vLLM's CPU backend holds an fp8 KV cache only on x86 CPUs with AVX-512 or "
            "AMX, and this CPU has neither")


def bf16_unaccelerated() -> str | None:
    """Why a bf16 model computes slowly on this CPU, or ``None`` where it
    does not: vLLM's CPU backend runs a layer's matrix product through oneDNN,
    which on an x86 CPU without AVX-512 BF16 or AMX refuses bf16 weights
    ("could not create a primitive descriptor"), so vLLM falls back to
    torch's bf16 ``linear``, whose cost there grows with every sequence of the
    batch (``benchmarks/bench_gemm_dtype.py`` measures both dtypes)."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return ("this CPU has neither AVX-512 BF16 nor AMX: vLLM's oneDNN matrix product "
            "refuses bf16 and falls back to torch's bf16 linear, which is compute-bound "
            "per sequence")


#: what ``--dtype`` takes in the benchmarks and the demo
DTYPE_CHOICES = ("auto", "bfloat16", "float32")


def add_dtype_argument(ap, what: str = "every engine's dtype") -> None:
    """The ``--dtype`` option (default ``auto``) of a benchmark or the demo."""
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                    help=f"{what} (auto: bfloat16 where the CPU computes it natively, else "
                         "float32; benchmarks/bench_gemm_dtype.py shows why)")


def chosen_dtype(dtype: str) -> str:
    """``dtype``, with ``"auto"`` resolved: ``bfloat16`` where the CPU
    computes it natively, ``float32`` where it does not (saying why on
    stdout)."""
    if dtype != "auto":
        return dtype
    why = bf16_unaccelerated()
    if not why:
        return "bfloat16"
    print(f"--dtype auto chose float32: {why}", flush=True)
    return "float32"
