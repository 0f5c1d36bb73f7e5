"""Counters where vLLM users look: the engine's log line and ``/metrics``.

The scheduler ships cumulative counters inside ``SchedulerStats`` (see
:mod:`vllm_kvshrink.serving.metrics.counters`); these wrappers take them out before
vLLM's own loggers see the stats, log them, and export them as Prometheus
series named ``vllm:kvshrink_*``: counters and gauges per engine, the bytes
held per storage form, and the seconds per phase of the plugin's work
(``vllm:kvshrink_seconds_total{phase=...}``,
:mod:`~vllm_kvshrink.serving.metrics.phases`).
"""

from __future__ import annotations

import dataclasses
import logging

from vllm_kvshrink.serving.metrics import phases
from vllm_kvshrink.serving.metrics.counters import STATS_KEY

logger = logging.getLogger("vllm.kvshrink")

_ORIG: dict[str, object] = {}
_PROM: dict[str, object] = {}
#: the last cumulative value exported per (engine, counter[, label value])
_LAST: dict[tuple, float] = {}
_FORMS_SEEN: set[str] = set()

_COUNTERS = {
    "compactions": "Compaction events completed by vllm-kvshrink.",
    "tokens_evicted": "KV-cache tokens evicted by vllm-kvshrink.",
    "blocks_freed": "KV-cache blocks returned to the pool by vllm-kvshrink.",
    "fallbacks": "Compactions that failed; the request continued uncompressed.",
    "tokens_merged": "Evicted tokens merged into kept ones (semantic merger).",
    "predictor_updates": "Online training steps of the temporal importance predictor.",
    "tier_events": "Tiered-storage events completed (forms re-assigned).",
    "tokens_demoted": "Tokens moved to a storage form with fewer bytes.",
    "ring_misses": "Steps in which a request found no query-ring slot (its "
                   "attention-scored compactions fall back).",
}
_GAUGES = {
    "compression_ratio": "Logical / cached tokens of running requests.",
    "bytes_ratio": ("Uncompressed bytes of running requests' logical tokens (at the "
                    "cache's element size) / KV bytes they hold."),
    "logical_tokens": "Logical tokens of running requests.",
    "foreign_weights": "Learned components (temporal predictor, semantic embedding) "
                       "whose weights were not trained on the served model.",
    "physical_tokens": "Tokens of running requests still in the KV cache.",
    "predictor_recall": "Temporal predictor: recall@10% of the tokens that receive "
                        "the most attention next (-1 until measured).",
    "predictor_spearman": "Temporal predictor: rank correlation of predicted and "
                          "received attention (-1 until measured).",
}


def split(scheduler_stats):
    """(stats without our payload, our payload or None)."""
    if scheduler_stats is None:
        return None, None
    payload = scheduler_stats.kv_connector_stats
    if not payload or STATS_KEY not in payload:
        return scheduler_stats, None
    rest = {k: v for k, v in payload.items() if k != STATS_KEY}
    return (
        dataclasses.replace(scheduler_stats, kv_connector_stats=rest or None),
        payload[STATS_KEY],
    )


def _prom():
    if not _PROM:
        from prometheus_client import Counter, Gauge

        for name, doc in _COUNTERS.items():
            _PROM[name] = Counter(f"vllm:kvshrink_{name}", doc, ["engine"])
        for name, doc in _GAUGES.items():
            _PROM[name] = Gauge(f"vllm:kvshrink_{name}", doc, ["engine"])
        _PROM["bytes_held"] = Gauge(
            "vllm:kvshrink_bytes_held",
            "KV bytes held by running requests, per storage form (codes, scales and "
            "zero points; the plain form bf16 at the cache's element size).",
            ["engine", "form"])
        _PROM["seconds"] = Counter(
            "vllm:kvshrink_seconds",
            "Seconds vllm-kvshrink spent in each phase of its own work (phase: "
            + ", ".join(phases.PHASES) + ").", ["engine", "phase"])
    return _PROM


def _grown(key: tuple, value: float) -> float:
    """How much the cumulative ``value`` under ``key`` grew since the last
    record (a value that went down counts nothing and starts over)."""
    delta = value - _LAST.get(key, 0.0)
    _LAST[key] = value
    return max(delta, 0.0)


def _logging_record(self, scheduler_stats=None, *args, **kwargs):
    stats, ours = split(scheduler_stats)
    if ours is not None:
        self._kvs_last = ours
    return _ORIG["logging_record"](self, stats, *args, **kwargs)


def _logging_log(self, *args, **kwargs):
    result = _ORIG["logging_log"](self, *args, **kwargs)
    ours = getattr(self, "_kvs_last", None)
    events = (ours.get("compactions", 0), ours.get("tier_events", 0)) if ours else None
    if ours is not None and events != getattr(self, "_kvs_logged", None):
        self._kvs_logged = events
        spent = phases.breakdown(ours.get("seconds") or {})
        spent = f"; phases: {spent}" if spent else ""
        if ours.get("tier_events", 0):
            held = ours.get("bytes_held") or {}
            logger.info(
                "KV shrink: %d tier events, %d tokens demoted, %d evicted, %d blocks "
                "freed, held %s, bytes ratio %.2fx, %d fallbacks%s",
                ours["tier_events"], ours["tokens_demoted"], ours["tokens_evicted"],
                ours["blocks_freed"],
                " ".join(f"{f}={b / 2**20:.1f}MiB" for f, b in held.items()) or "-",
                ours.get("bytes_ratio", 1.0), ours["fallbacks"], spent)
        else:
            logger.info(
                "KV shrink: %d compactions, %d tokens evicted, %d blocks freed, "
                "ratio %.2fx, %d fallbacks%s",
                ours["compactions"], ours["tokens_evicted"], ours["blocks_freed"],
                ours["compression_ratio"], ours["fallbacks"], spent,
            )
    return result


def _prom_record(self, scheduler_stats=None, iteration_stats=None, mm_cache_stats=None,
                 engine_idx: int = 0, *args, **kwargs):
    stats, ours = split(scheduler_stats)
    if ours is not None:
        prom = _prom()
        engine = str(engine_idx)
        for name in _COUNTERS:
            delta = _grown((engine_idx, name), float(ours.get(name, 0)))
            if delta > 0:
                prom[name].labels(engine).inc(delta)
        for phase, value in (ours.get("seconds") or {}).items():
            delta = _grown((engine_idx, "seconds", phase), float(value))
            if delta > 0:
                prom["seconds"].labels(engine, phase).inc(delta)
        for name in _GAUGES:
            prom[name].labels(engine).set(float(ours.get(name, 0)))
        held = ours.get("bytes_held") or {}
        for form in set(held) | _FORMS_SEEN:
            prom["bytes_held"].labels(engine, form).set(float(held.get(form, 0)))
        _FORMS_SEEN.update(held)
    return _ORIG["prom_record"](self, stats, iteration_stats, mm_cache_stats,
                                engine_idx, *args, **kwargs)


def install() -> None:
    if _ORIG:
        return
    from vllm.v1.metrics import loggers

    from vllm_kvshrink.serving import compat

    _ORIG["logging_record"] = compat.patch(loggers.LoggingStatLogger, "record",
                                           _logging_record)
    _ORIG["logging_log"] = compat.patch(loggers.LoggingStatLogger, "log", _logging_log)
    _ORIG["prom_record"] = compat.patch(loggers.PrometheusStatLogger, "record",
                                        _prom_record)
