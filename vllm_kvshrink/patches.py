"""Installs every patch, once per process.  The seams are listed in compat.py."""

from __future__ import annotations

import logging

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError

logger = logging.getLogger("vllm_kvshrink")
_INSTALLED = False


def _install_scheduler() -> None:
    from vllm.config.scheduler import SchedulerConfig
    from vllm.v1.core.sched.scheduler import Scheduler

    original = SchedulerConfig.get_scheduler_cls

    def get_scheduler_cls(self):
        from vllm_kvshrink.core.scheduler import KVShrinkScheduler

        chosen = original(self)
        if issubclass(chosen, KVShrinkScheduler):
            return chosen
        if chosen.__name__ == "AsyncScheduler" or chosen is Scheduler:
            return KVShrinkScheduler
        raise KVShrinkConfigError(
            f"scheduler_cls={chosen.__module__}.{chosen.__qualname__} cannot be "
            f"combined with VLLM_KVSHRINK_METHOD; allowed: vLLM's default "
            f"scheduler or a subclass of "
            f"vllm_kvshrink.core.scheduler.KVShrinkScheduler"
        )

    get_scheduler_cls._kvshrink = True  # type: ignore[attr-defined]
    SchedulerConfig.get_scheduler_cls = get_scheduler_cls


def _install_attention() -> None:
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    register_backend(
        AttentionBackendEnum.CPU_ATTN,
        "vllm_kvshrink.attention.cpu.KVShrinkCPUAttentionBackend",
    )


def _install_request_validation(cfg: KVShrinkConfig) -> None:
    """Reject bad per-request settings in the front-end, as a 400 / ValueError."""
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_kvshrink.config import request_overrides

    original = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        if extra:
            # KVShrinkConfigError is a ValueError: vLLM answers 400 / raises.
            cfg.with_overrides(request_overrides(extra))
        return original(self, params, *args, **kwargs)

    InputProcessor._validate_params = _validate_params


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
    from vllm_kvshrink.metrics import loggers
    from vllm_kvshrink.worker import runner_patch

    _install_scheduler()
    _install_attention()
    _install_request_validation(cfg)
    runner_patch.install(cfg)
    loggers.install()
    _INSTALLED = True
    logger.info("vllm-kvshrink: method=%s installed", cfg.method)
