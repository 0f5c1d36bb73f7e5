"""What a configuration may not combine, checked the same way at start-up and
for every request.

Each refusal raises :class:`~vllm_kvshrink.envs.KVShrinkConfigError` with one
message naming the setting (as the user wrote it: a ``VLLM_KVSHRINK_*``
variable or ``extra_args['kvshrink'][...]``), its value and what is allowed.
"""

from __future__ import annotations

from typing import Any, Mapping

from vllm_kvshrink import envs

#: ``kv_cache_dtype`` values whose pages are in a float model dtype, which
#: packed blocks reinterpret as bytes
PAGEABLE_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _where(cfg, field: str) -> str:
    return cfg.source.get(field, envs.PREFIX + field.upper())


def check_cache_dtype(cfg, cache_dtype: str) -> None:
    """Tiered storage packs tokens into pages of the model dtype: refuse it
    with one of vLLM's quantized caches, naming both settings."""
    if cfg.tiered and cfg.enabled and cache_dtype not in PAGEABLE_CACHE_DTYPES:
        raise envs.KVShrinkConfigError(
            f"{_where(cfg, 'storage')}={','.join(cfg.storage)!r} packs tokens into "
            f"pages of the model dtype, but kv_cache_dtype={cache_dtype!r}; allowed "
            f"with tiered storage: kv_cache_dtype='auto' (or storage 'bf16' with "
            f"{cache_dtype!r})")


def check_storage_method(cfg) -> None:
    """Tiered storage needs an importance method to choose each token's form:
    refuse a storage naming more than ``bf16`` with method ``none``."""
    if cfg.tiered and not cfg.enabled:
        ws, wm = _where(cfg, "storage"), _where(cfg, "method")
        raise envs.KVShrinkConfigError(
            f"{ws}={','.join(cfg.storage)!r} needs an importance method to choose "
            f"each token's form, but {wm} is 'none'; allowed: set {wm} (e.g. "
            f"snapkv, temporal) or leave {ws} at 'bf16'")


def check_streaming(cfg, resumable: bool) -> None:
    """Streaming-input sessions (``AsyncLLM.generate`` fed by an input stream)
    re-add a live request to extend it; a compacted cache cannot be extended
    that way yet, so such sessions must opt out."""
    if resumable and cfg.enabled:
        raise envs.KVShrinkConfigError(
            f"streaming-input sessions are not supported with KV compression "
            f"(method {cfg.method!r}): a session extends a cache that has been "
            f"compacted; allowed: opt the session out with "
            f"extra_args={{'kvshrink': {{'method': 'none'}}}} or run without "
            f"VLLM_KVSHRINK_METHOD")


def request_config(cfg, extra_args: Mapping[str, Any] | None, cache_dtype: str):
    """The configuration one request runs under: ``cfg`` with the request's
    settings from ``SamplingParams.extra_args``, refused (raising) if the
    engine cannot serve it.

    A request that opts out (``method: none``) keeps the global storage
    unused; one that names a tiered ``storage`` itself while its method is
    ``none`` is refused, as the same pair is at start-up."""
    from vllm_kvshrink.config import request_overrides

    overrides = request_overrides(extra_args)
    req_cfg = cfg.with_overrides(overrides)
    req_cfg.check_servable()
    check_cache_dtype(req_cfg, cache_dtype)
    if overrides and "storage" in overrides:
        check_storage_method(req_cfg)
    return req_cfg
