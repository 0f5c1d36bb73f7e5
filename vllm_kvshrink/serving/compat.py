"""The vLLM versions the plugin supports and every vLLM symbol it touches.

Patching vLLM is unavoidable (it has no official seam for moving cached
tokens); this module keeps the list in one place.  ``check()`` resolves every
symbol and compares the parameters of every patched callable, and
``tests/unit/test_compat.py`` runs it, so an upgrade that moves a seam fails loudly
instead of silently corrupting requests.

The list cannot drift from the code: every patch goes through :func:`patch`,
which refuses a symbol that is not listed here; the scheduler's overridden
methods are checked against the list by ``tests/unit/test_compat.py``; and the
private attributes the plugin reads on vLLM's objects (:data:`ATTRIBUTES`) are
checked on the live objects at start-up by :func:`check_attributes`.
"""

from __future__ import annotations

import importlib
import inspect
import re
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
    Symbol("vllm.v1.core.sched.scheduler:Scheduler.add_request",
           ("self", "request"), "per-request settings; streaming-input continuations"),
    Symbol("vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
           ("self", "scheduler_output", "model_runner_output"),
           "read each compaction's result back from the worker"),
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
    Symbol("vllm.v1.worker.gpu_model_runner:GPUModelRunner._build_attention_metadata",
           ("self", "num_tokens", "num_reqs", "max_query_len"),
           "hand the step's context (query capture, packed blocks) to attention on "
           "the attention metadata of the step (returns (per-layer metadata, "
           "spec-decode common metadata))"),
    Symbol("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
           ("self", "scheduler_output"),
           "run the step's compactions after the forward pass"),
    Symbol("vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
           ("self",), "attach compaction results to the step's output"),
    Symbol("vllm.v1.worker.block_table:MultiGroupBlockTable.compute_slot_mapping",
           ("self", "num_reqs", "query_start_loc", "positions"),
           "slot mapping from physical positions"),
    Symbol("vllm.v1.worker.block_table:BlockTable.add_row",
           ("self", "block_ids", "row_idx"), "replace a compacted request's row"),
    Symbol("vllm.distributed.parallel_state:get_tp_group", (),
           "the tensor-parallel group whose ranks agree on every event "
           "(world_size, rank_in_group, cpu_group)"),
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
    Symbol("vllm.v1.metrics.loggers:LoggingStatLogger.record",
           ("self", "scheduler_stats"), "keep the counters for the log line"),
)

#: Attributes of vLLM's live objects the plugin reads or writes that are not
#: part of a signature (many are private).  ``kind`` -> dotted attribute paths;
#: :func:`check_attributes` resolves them on the real objects at start-up.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "scheduler": (
        "kv_cache_manager.coordinator.single_type_managers",
        "kv_cache_manager.block_pool",
        "kv_cache_manager.allocate_slots",
        "kv_cache_config.kv_cache_groups",
        "scheduler_config.max_num_batched_tokens",
        "max_model_len",
        "requests",
        "running",
        "vllm_config.cache_config.cache_dtype",
    ),
    "single_type_manager": ("req_to_blocks",),
    "block_pool": ("blocks", "get_new_blocks", "free_blocks", "get_num_free_blocks",
                   "evict_blocks"),
    "block": ("block_id", "ref_cnt"),
    "tp_group": ("world_size", "rank_in_group", "cpu_group"),
    "model_runner": (
        "kv_cache_config.kv_cache_groups",
        "compilation_config.static_forward_context",
        "scheduler_config.max_num_seqs",
        "model_config.dtype",
        "requests",
        "input_batch.req_ids",
        "input_batch.num_reqs",
        "input_batch.req_id_to_index",
        "input_batch.num_computed_tokens_cpu",
        "input_batch.block_table.block_tables",
        "seq_lens",
        "optimistic_seq_lens_cpu",
    ),
}

#: ``"module:Qualified.name"`` -> the original of every symbol :func:`patch`
#: replaced in this process.
PATCHED: dict[str, object] = {}


def _path_of(owner, name: str) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}:{owner.__qualname__}.{name}"
    return f"{owner.__name__}:{name}"  # a module


def patch(owner, name: str, replacement) -> object:
    """Replace ``owner.name`` (a class or module attribute) by ``replacement``
    and return the original.  Only symbols listed in :data:`SYMBOLS` may be
    patched, so the list is the patch sites' own."""
    path = _path_of(owner, name)
    if path not in {s.path for s in SYMBOLS}:
        raise RuntimeError(f"vllm-kvshrink patches {path}, which is not listed in "
                           f"vllm_kvshrink.serving.compat.SYMBOLS")
    original = PATCHED.setdefault(path, getattr(owner, name))
    setattr(owner, name, replacement)
    return original


def check_attributes(kind: str, obj) -> None:
    """Raise, naming what is missing, when ``obj`` lacks an attribute listed
    under ``kind`` in :data:`ATTRIBUTES`."""
    missing = []
    for dotted in ATTRIBUTES[kind]:
        cur = obj
        for part in dotted.split("."):
            if not hasattr(cur, part):
                missing.append(dotted)
                break
            cur = getattr(cur, part)
    if missing:
        raise KVShrinkConfigError(
            f"vLLM {vllm_version()}'s {type(obj).__name__} lacks "
            f"{', '.join(missing)}, which vllm-kvshrink relies on (supported: vllm "
            f"{SUPPORTED}; set VLLM_KVSHRINK_METHOD=none to run stock vLLM)")


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
