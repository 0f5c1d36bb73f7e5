"""Registry of compression methods, by the names ``VLLM_KVSHRINK_METHOD`` takes."""

from __future__ import annotations

from typing import Callable

from vllm_kvshrink.methods.base import ScoringMethod, select_keep
from vllm_kvshrink.methods.knorm import KeyNorm
from vllm_kvshrink.methods.snapkv import SnapKV
from vllm_kvshrink.methods.streaming import StreamingLLM

#: name -> (factory taking the plugin config, one-line description)
_REGISTRY: dict[str, tuple[Callable[..., ScoringMethod] | None, str]] = {
    "none": (None, "no compression: stock vLLM behaviour"),
    "streaming": (
        lambda cfg: StreamingLLM(),
        "StreamingLLM: attention sinks + most recent tokens (arXiv:2309.17453)",
    ),
    "knorm": (
        lambda cfg: KeyNorm(),
        "Key-norm: keys with the smallest L2 norm, per KV head (arXiv:2406.11430)",
    ),
    "snapkv": (
        lambda cfg: SnapKV(pool_kernel=cfg.pool_kernel),
        "SnapKV: observation-window attention, pooled, per KV head "
        "(arXiv:2404.14469)",
    ),
}


def available_methods() -> list[str]:
    return list(_REGISTRY)


def describe_methods() -> str:
    return "\n".join(f"{name:<10} {doc}" for name, (_, doc) in _REGISTRY.items())


def build_method(cfg) -> ScoringMethod | None:
    """The method object named by ``cfg.method`` (``None`` for 'none')."""
    factory, _ = _REGISTRY[cfg.method]
    return None if factory is None else factory(cfg)


__all__ = [
    "ScoringMethod",
    "select_keep",
    "available_methods",
    "describe_methods",
    "build_method",
]
