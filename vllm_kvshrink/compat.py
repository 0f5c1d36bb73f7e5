"""The vLLM versions the plugin supports and every vLLM symbol it touches.

Patching vLLM is unavoidable (it has no official seam for moving cached
tokens); this module keeps the list in one place.  ``check()`` resolves every
symbol and compares the parameters of every patched callable, and
``tests/test_compat.py`` runs it, so an upgrade that moves a seam fails loudly
instead of silently corrupting requests.
"""

from __future__ import annotations

import importlib
import re
import inspect
from dataclasses import dataclass

from vllm_kvshrink.envs import KVShrinkConfigError

#: Supported vLLM versions: [min, max) by (major, minor, patch).
MIN_VERSION = (0, 32, 0)
MAX_VERSION = (0, 33, 0)
SUPPORTED = ">=0.32.0,<0.33"


@dataclass(frozen=True)
class Symbol:
    path: str  # "module:Qualified.name"
    #: Leading parameter names the plugin relies on (``None``: not callable /
    #: not checked).
    params: tuple[str, ...] | None = None
    why: str = ""


SYMBOLS: tuple[Symbol, ...] = (
    # ---- scheduler side (EngineCore process)
    Symbol("vllm.v1.core.sched.scheduler:Scheduler.schedule", ("self",),
           "plan compactions before each step, attach them to the output"),
    Symbol("vllm.v1.core.sched.scheduler:Scheduler._preempt_request",
           ("self", "request", "timestamp"), "reset offsets on preemption"),
    Symbol("vllm.v1.core.sched.scheduler:Scheduler._free_request",
           ("self", "request"), "drop per-request state when a request ends"),
    Symbol("vllm.v1.core.sched.scheduler:Scheduler.make_stats",
           ("self",), "export compression counters with the engine stats"),
    Symbol("vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots",
           ("self", "request", "num_new_tokens", "num_new_computed_tokens",
            "new_computed_blocks", "num_lookahead_tokens",
            "num_external_computed_tokens", "delay_cache_blocks"),
           "size allocations by the physical (compacted) length"),
    Symbol("vllm.v1.core.block_pool:BlockPool.free_blocks",
           ("self", "ordered_blocks"), "give freed blocks back to the pool"),
    Symbol("vllm.v1.core.block_pool:BlockPool.get_new_blocks",
           ("self", "num_blocks"),
           "copy-on-write of shared blocks; packed blocks of tiered requests"),
    Symbol("vllm.v1.core.block_pool:BlockPool.get_num_free_blocks", ("self",),
           "take packed blocks only when the pool has them"),
    Symbol("vllm.v1.core.block_pool:BlockPool.evict_blocks",
           ("self", "block_ids"), "drop prefix-cache hashes of rewritten blocks"),
    Symbol("vllm.v1.core.single_type_kv_cache_manager:"
           "SingleTypeKVCacheManager.free", ("self", "request_id")),
    Symbol("vllm.config.scheduler:SchedulerConfig.get_scheduler_cls",
           ("self",), "select the compaction-aware scheduler"),
    Symbol("vllm.v1.core.sched.output:SchedulerOutput",
           None, "carries the per-step compaction plan to the workers"),
    Symbol("vllm.v1.metrics.stats:SchedulerStats", None,
           "carries the counters to the front-end"),
    # ---- worker side (model runner)
    Symbol("vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
           ("self", "scheduler_output"), "apply compaction plans first"),
    Symbol("vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
           ("self", "scheduler_output", "num_scheduled_tokens"),
           "physical seq_lens and slot mapping, logical positions"),
    Symbol("vllm.v1.worker.block_table:MultiGroupBlockTable.compute_slot_mapping",
           ("self", "num_reqs", "query_start_loc", "positions"),
           "slot mapping from physical positions"),
    Symbol("vllm.v1.worker.block_table:BlockTable.add_row",
           ("self", "block_ids", "row_idx"), "replace a compacted request's row"),
    # ---- attention (CPU)
    Symbol("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
           ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata",
            "output"), "capture the observation window of queries; attention of "
           "requests with packed blocks (tiered storage) by the plugin's kernel"),
    Symbol("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend", None),
    Symbol("vllm.v1.attention.backends.registry:register_backend", None,
           "install the query-capturing attention backend"),
    Symbol("vllm.v1.attention.backends.registry:AttentionBackendEnum", None),
    Symbol("vllm._custom_ops:cpu_attn_reshape_and_cache",
           ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"),
           "probe the CPU paged-KV layout through vLLM's own write op"),
    Symbol("vllm.model_executor.layers.rotary_embedding.base:"
           "RotaryEmbedding._compute_inv_freq", ("self", "base"),
           "the model's RoPE frequencies for expected_attention"),
    Symbol("vllm.v1.core.sched.scheduler:Scheduler._request_remaining_blocks",
           ("self", "request"), "admission by the compressed peak"),
    Symbol("vllm.v1.core.kv_cache_utils:_check_enough_kv_cache_memory",
           ("available_memory", "get_needed_memory", "max_model_len"),
           "allow a pool smaller than max_model_len with compression on"),
    # ---- front-end
    Symbol("vllm.v1.engine.input_processor:InputProcessor.process_inputs",
           ("self", "request_id", "prompt", "params"),
           "refuse requests that cannot fit the pool even compressed"),
    Symbol("vllm.v1.engine.input_processor:InputProcessor._validate_params",
           ("self", "params"), "reject bad per-request settings with a clear error"),
    # ---- metrics (front-end)
    Symbol("vllm.v1.metrics.loggers:PrometheusStatLogger.record",
           ("self", "scheduler_stats"), "export counters on /metrics"),
    Symbol("vllm.v1.metrics.loggers:LoggingStatLogger.log", ("self",),
           "log counters with the engine stats"),
)


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def _parse(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        match = re.match(r"\d+", piece)  # "0rc1" -> 0: leading digits only
        parts.append(int(match.group()) if match else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_version(version: str | None = None) -> None:
    version = version or vllm_version()
    if not (MIN_VERSION <= _parse(version) < MAX_VERSION):
        raise KVShrinkConfigError(
            f"vLLM {version} is not supported by vllm-kvshrink; allowed: vllm "
            f"{SUPPORTED} (set VLLM_KVSHRINK_METHOD=none to run stock vLLM)"
        )


def resolve(path: str):
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def check() -> list[str]:
    """Problems found with the patched symbols (empty list: all present)."""
    problems = []
    for sym in SYMBOLS:
        try:
            obj = resolve(sym.path)
        except (ImportError, AttributeError) as e:
            problems.append(f"{sym.path}: missing ({e.__class__.__name__}: {e})")
            continue
        if sym.params is None:
            continue
        try:
            names = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError) as e:
            problems.append(f"{sym.path}: no signature ({e})")
            continue
        if names[: len(sym.params)] != list(sym.params):
            problems.append(
                f"{sym.path}: parameters {names[: len(sym.params)]} != expected "
                f"{list(sym.params)}"
            )
    return problems


def check_or_raise() -> None:
    problems = check()
    if problems:
        raise KVShrinkConfigError(
            f"vLLM {vllm_version()} does not have the seams vllm-kvshrink patches "
            f"(supported: vllm {SUPPORTED}):\n  " + "\n  ".join(problems)
        )
