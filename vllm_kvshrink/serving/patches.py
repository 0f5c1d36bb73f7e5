"""Installs every patch, once per process.  The seams are listed in compat.py."""

from __future__ import annotations

import logging

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError
from vllm_kvshrink.serving import compat

logger = logging.getLogger("vllm.kvshrink")
_INSTALLED = False


def _install_scheduler() -> None:
    from vllm.config.scheduler import SchedulerConfig
    from vllm.v1.core.sched.scheduler import Scheduler

    original = SchedulerConfig.get_scheduler_cls

    def get_scheduler_cls(self):
        from vllm_kvshrink.serving.core.scheduler import KVShrinkScheduler

        chosen = original(self)
        if issubclass(chosen, KVShrinkScheduler):
            return chosen
        if chosen.__name__ == "AsyncScheduler" or chosen is Scheduler:
            return KVShrinkScheduler
        raise KVShrinkConfigError(
            f"scheduler_cls={chosen.__module__}.{chosen.__qualname__} cannot be "
            f"combined with VLLM_KVSHRINK_METHOD; allowed: vLLM's default "
            f"scheduler or a subclass of "
            f"vllm_kvshrink.serving.core.scheduler.KVShrinkScheduler"
        )

    get_scheduler_cls._kvshrink = True  # type: ignore[attr-defined]
    compat.patch(SchedulerConfig, "get_scheduler_cls", get_scheduler_cls)


def _install_attention() -> None:
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    register_backend(
        AttentionBackendEnum.CPU_ATTN,
        "vllm_kvshrink.serving.attention.cpu.KVShrinkCPUAttentionBackend",
    )


def _install_request_validation(cfg: KVShrinkConfig) -> None:
    """Front-end checks, answered as a 400 / ValueError before the engine:
    bad per-request settings, and requests that cannot fit the KV pool."""
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_kvshrink.policy.checks import request_config

    original = InputProcessor._validate_params
    original_process = InputProcessor.process_inputs

    from vllm.exceptions import VLLMValidationError

    def _validate_params(self, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        if extra:
            try:
                request_config(cfg, extra, self.vllm_config.cache_config.cache_dtype)
            except KVShrinkConfigError as e:
                # A client error: the OpenAI server answers 400 with this text.
                raise VLLMValidationError(str(e), parameter="extra_args") from e
        return original(self, params, *args, **kwargs)

    def process_inputs(self, *args, **kwargs):
        request = original_process(self, *args, **kwargs)
        try:
            _check_streaming(cfg, request)
            _check_fits(self.vllm_config, cfg, request)
        except KVShrinkConfigError as e:
            raise VLLMValidationError(str(e), parameter="prompt") from e
        return request

    compat.patch(InputProcessor, "_validate_params", _validate_params)
    compat.patch(InputProcessor, "process_inputs", process_inputs)


def _check_streaming(cfg: KVShrinkConfig, request) -> None:
    """A streaming-input session (``request.resumable``) under the settings
    it runs with (:func:`~vllm_kvshrink.policy.checks.check_streaming`)."""
    from vllm_kvshrink.config import request_overrides
    from vllm_kvshrink.policy.checks import check_streaming

    if not getattr(request, "resumable", False):
        return
    sp = getattr(request, "sampling_params", None)
    req_cfg = cfg.with_overrides(request_overrides(sp.extra_args if sp else None))
    check_streaming(req_cfg, True)


def _check_fits(vllm_config, cfg: KVShrinkConfig, request) -> None:
    """A pool smaller than ``max_model_len`` is allowed with compression on
    (see _install_memory_check); a request that could not fit even so is
    refused here rather than left waiting forever."""
    from vllm_kvshrink.config import request_overrides

    cache = vllm_config.cache_config
    sp = getattr(request, "sampling_params", None)
    if not cache.num_gpu_blocks or sp is None:
        return
    bs = cache.block_size
    pool = (cache.num_gpu_blocks - 1) * bs  # one block is vLLM's null block
    total = min(len(request.prompt_token_ids or ()) + (sp.max_tokens or 0),
                vllm_config.model_config.max_model_len)
    if total <= pool:
        return
    req_cfg = cfg.with_overrides(request_overrides(sp.extra_args))
    if not req_cfg.enabled:
        raise KVShrinkConfigError(
            f"request of {total} tokens does not fit the KV pool ({pool} tokens) "
            f"uncompressed, and it sets method 'none'; allowed: keep compression "
            f"on for it (drop the per-request method) or shorten it"
        )
    from vllm_kvshrink.policy.nbytes import request_peak_blocks
    from vllm_kvshrink.storage.geometry import TierGeometry

    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    geo = None
    if req_cfg.tiered:
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        geo = TierGeometry(mc.get_num_layers(pc), mc.get_total_num_kv_heads(),
                           mc.get_head_size(), bs, mc.dtype.itemsize)
    need = request_peak_blocks(req_cfg, total, bs, chunk, geo)
    if need <= cache.num_gpu_blocks - 1:
        return
    if req_cfg.tiered:  # blocks by form, as the scheduler counts them
        raise KVShrinkConfigError(
            f"request of {total} tokens needs up to {need} KV blocks even with "
            f"tiered storage (budget {req_cfg.budget!r} of its bf16 bytes in "
            f"{','.join(req_cfg.storage)}, + slack {req_cfg.slack_tokens} + one "
            f"prefill chunk of {chunk}), more than the KV pool "
            f"({cache.num_gpu_blocks - 1} blocks); allowed: a smaller budget, "
            f"smaller max_num_batched_tokens, or a larger pool")
    raise KVShrinkConfigError(
        f"request of {total} tokens needs up to {req_cfg.peak_tokens(total, bs, chunk)} "
        f"cached tokens even compressed (budget {req_cfg.budget!r} + slack "
        f"{req_cfg.slack_tokens} + one prefill chunk of {chunk}),"
        f" more than the KV pool ({pool} tokens); allowed: a smaller budget, "
        f"smaller max_num_batched_tokens, or a larger pool"
    )


def _install_memory_check(cfg: KVShrinkConfig) -> None:
    """vLLM refuses to start when the pool cannot hold one ``max_model_len``
    sequence.  With compression on, a request only needs its compressed peak;
    the per-request check above refuses what cannot fit."""
    from vllm.v1.core import kv_cache_utils

    original = kv_cache_utils._check_enough_kv_cache_memory

    def _check_enough_kv_cache_memory(available_memory, *args, **kwargs):
        try:
            return original(available_memory, *args, **kwargs)
        except ValueError as e:
            if available_memory <= 0:
                raise
            logger.warning(
                "vllm-kvshrink: %s -- continuing because VLLM_KVSHRINK_METHOD=%s "
                "keeps each request within its budget; requests that cannot fit "
                "even compressed are refused when they arrive.", e, cfg.method)

    compat.patch(kv_cache_utils, "_check_enough_kv_cache_memory",
                 _check_enough_kv_cache_memory)


def install(cfg: KVShrinkConfig) -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise KVShrinkConfigError(
            f"VLLM_KVSHRINK_METHOD={cfg.method!r} needs vLLM's CPU engine for now "
            f"(this platform: {current_platform.device_name!r}); the CUDA engine "
            f"path is not implemented yet (set VLLM_KVSHRINK_METHOD=none)"
        )
    from vllm_kvshrink.serving.metrics import loggers
    from vllm_kvshrink.serving.worker import runner_patch

    _install_scheduler()
    _install_attention()
    _install_request_validation(cfg)
    _install_memory_check(cfg)
    runner_patch.install()
    loggers.install()
    _INSTALLED = True
    logger.info("vllm-kvshrink: method=%s installed", cfg.method)
