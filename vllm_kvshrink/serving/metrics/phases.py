"""Seconds the plugin spends per phase of its own work: where the time goes.

Each side keeps ``{phase: cumulative seconds}``: the worker in its
:class:`~vllm_kvshrink.serving.worker.compactor.Compactor` (reported to the
scheduler with its statistics), the scheduler in its
:class:`~vllm_kvshrink.serving.metrics.counters.Counters`, which export the
union as ``vllm:kvshrink_seconds_total{phase=...}``.  Timing is
``time.perf_counter`` only: no device synchronization, nothing allocated
besides the float.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

#: The phases, in the order they are shown, with what each one times.
PHASES = {
    "capture": "query rows copied into the observation ring (attention, per layer)",
    "packed_attention": "attention over packed blocks (attention, per layer)",
    "packed_batch": "the step's packed batch built for attention (model runner)",
    "scoring": "eviction: the method scores and selects the kept tokens",
    "move": "eviction: kept tokens moved (or merged ones written) in every layer",
    "event_read": "tier event: every held token read, packed ones dequantized",
    "event_plan": "tier event: the tier policy (scores, levels, budget)",
    "event_pack": "tier event: tokens packed into their forms' pages",
    "event_write": "tier event: plain row and pages written into the cache",
    "scheduler": "the plugin's bookkeeping in the scheduler (vLLM's own excluded)",
}

#: The phases that are an event's work (eviction's compaction, a tier event).
EVENT_PHASES = ("scoring", "move", "event_read", "event_plan", "event_pack", "event_write")


def add(seconds: dict[str, float], phase: str, dt: float) -> None:
    """Count ``dt`` seconds to ``phase``."""
    seconds[phase] = seconds.get(phase, 0.0) + dt


@contextmanager
def timed(seconds: dict[str, float], phase: str):
    """``with timed(seconds, "scoring"): ...`` counts the block's seconds to
    ``phase`` (also when it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add(seconds, phase, time.perf_counter() - t0)


def total(seconds: dict[str, float]) -> float:
    """Seconds of every phase together."""
    return float(sum(seconds.values()))


def share(seconds: dict[str, float], wall: float) -> float:
    """Share of ``wall`` seconds spent in the plugin's phases (0 when
    ``wall`` is not positive)."""
    return total(seconds) / wall if wall > 0 else 0.0


def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds per phase spent between two readings of the cumulative
    seconds (the phases that took time)."""
    spent = {p: v - before.get(p, 0.0) for p, v in after.items()}
    return {p: v for p, v in spent.items() if v > 0}


def breakdown(seconds: dict[str, float]) -> str:
    """``"capture 0.12s, event_pack 2.31s, scheduler 4.20ms"``: the phases
    that took time, in :data:`PHASES` order (others after), ``""`` when none
    did."""
    order = list(PHASES) + sorted(set(seconds) - set(PHASES))
    return ", ".join(f"{p} {_duration(seconds[p])}" for p in order
                     if seconds.get(p, 0.0) > 0)


def _duration(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds >= 0.01 else f"{seconds * 1e3:.2f}ms"
