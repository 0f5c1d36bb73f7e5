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
