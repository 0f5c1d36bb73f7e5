"""vllm-kvshrink: KV-cache compression inside vLLM's v1 engine.

vLLM calls :func:`register` in every process it starts (front-end, engine
core, workers) through the ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"

_REGISTERED = False


def register() -> None:
    """Validate the settings, make them this process's configuration
    (:func:`vllm_kvshrink.config.current`) and install the engine patches
    (idempotent).

    With ``VLLM_KVSHRINK_METHOD=none`` (the default) nothing is patched and
    vLLM behaves exactly as stock.  A bad setting raises
    :class:`~vllm_kvshrink.envs.KVShrinkConfigError`, which stops vLLM's
    start-up with a message naming the variable, its value and what is allowed.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm_kvshrink import config
    from vllm_kvshrink.config import KVShrinkConfig

    _declare_env_vars()
    cfg = KVShrinkConfig.from_env()
    from vllm_kvshrink.policy.checks import check_storage_method

    check_storage_method(cfg)  # a storage never silently ignored
    if cfg.enabled:
        from vllm_kvshrink.serving import compat, patches

        cfg.check_servable()
        compat.check_version()
        compat.check_or_raise()
        patches.install(cfg)
    # The one configuration of this process: the scheduler and the worker
    # read it (config.current()) instead of the environment.
    config.set_current(cfg)
    _REGISTERED = True


def _declare_env_vars() -> None:
    """Tell vLLM our ``VLLM_KVSHRINK_*`` variables are known, so it does not
    warn about (or, with hard failure on, refuse) them."""
    import os

    from vllm import envs as vllm_envs

    from vllm_kvshrink import envs

    table = getattr(vllm_envs, "environment_variables", None)
    if isinstance(table, dict):
        for name in envs.ENV_VARS:
            table.setdefault(name, lambda n=name: os.environ.get(n))


def is_active() -> bool:
    """Whether :func:`register` installed the compression path in this process."""
    from vllm_kvshrink.serving import patches

    return patches._INSTALLED
