"""Seconds per phase, from where they are counted to ``/metrics``: the
counters' ``seconds`` travel in the scheduler's stats, the Prometheus logger
exports them as one family ``vllm:kvshrink_seconds_total`` labelled by
engine and phase, increased by what grew since the last record, and the
log line and the serving benchmark's scrape read them back (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvshrink.lab.bench.server import by_label
from vllm_kvshrink.serving.metrics import loggers, phases
from vllm_kvshrink.serving.metrics.counters import STATS_KEY, Counters

FAMILY = "vllm:kvshrink_seconds_total"


def test_timed_counts_the_block_also_when_it_raises():
    seconds: dict[str, float] = {}
    with phases.timed(seconds, "scoring"):
        pass
    with pytest.raises(RuntimeError), phases.timed(seconds, "move"):
        raise RuntimeError("failed move")
    phases.add(seconds, "scoring", 1.0)
    assert set(seconds) == {"scoring", "move"} and seconds["scoring"] >= 1.0
    assert seconds["move"] >= 0.0


def test_breakdown_since_and_share():
    spent = {"scheduler": 0.5, "capture": 0.25, "event_pack": 0.0, "custom": 1.0}
    assert phases.breakdown(spent) == "capture 0.25s, scheduler 0.50s, custom 1.00s"
    assert phases.breakdown({"move": 0.00425}) == "move 4.25ms"
    assert phases.breakdown({}) == ""
    assert phases.since({"capture": 0.25}, {"capture": 1.0, "move": 0.5, "scoring": 0.0}) \
        == {"capture": 0.75, "move": 0.5}
    assert phases.share(spent, 7.0) == pytest.approx(0.25)
    assert phases.share(spent, 0.0) == 0.0


def _stats(counters: Counters):
    from vllm.v1.metrics.stats import SchedulerStats

    return SchedulerStats(kv_connector_stats={STATS_KEY: counters.to_dict()})


def _scrape() -> str:
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY).decode()


def test_seconds_reach_prometheus_as_one_family_by_deltas(monkeypatch):
    from prometheus_client import REGISTRY

    seen = []
    monkeypatch.setitem(loggers._ORIG, "prom_record",
                        lambda self, stats, *a, **kw: seen.append(stats))
    engine = 7  # an engine index of this test only (the registry is global)
    before = by_label(_scrape(), FAMILY, "phase")
    c = Counters(seconds={"capture": 0.5, "event_pack": 2.0, "scheduler": 0.25})
    loggers._prom_record(None, _stats(c), engine_idx=engine)
    assert seen[-1].kv_connector_stats is None  # vLLM's logger never sees ours

    def value(phase):
        return REGISTRY.get_sample_value(FAMILY, {"engine": str(engine), "phase": phase})

    assert (value("capture"), value("event_pack"), value("scheduler")) == (0.5, 2.0, 0.25)
    assert value("move") is None  # a phase appears once it has counted
    # Cumulative values in, deltas out: the counter follows them.
    c.seconds.update(capture=0.75, move=1.0)
    loggers._prom_record(None, _stats(c), engine_idx=engine)
    assert (value("capture"), value("event_pack"), value("move")) == (0.75, 2.0, 1.0)
    text = _scrape()
    assert f"# TYPE {FAMILY} counter" in text
    assert f'{FAMILY}{{engine="{engine}",phase="move"}} 1.0' in text
    # what the serving benchmark reads around its measured run
    spent = phases.since(before, by_label(text, FAMILY, "phase"))
    assert spent == pytest.approx(
        {"capture": 0.75, "event_pack": 2.0, "scheduler": 0.25, "move": 1.0})


def test_the_log_line_ends_with_the_phases(monkeypatch):
    lines = []
    monkeypatch.setitem(loggers._ORIG, "logging_log", lambda self, *a, **kw: None)
    monkeypatch.setattr(loggers, "logger", SimpleNamespace(
        info=lambda fmt, *args: lines.append(fmt % args)))
    c = Counters(compactions=2, tokens_evicted=10,
                 seconds={"scoring": 0.5, "move": 0.25, "capture": 0.0})
    this = SimpleNamespace(_kvs_last=c.to_dict())
    loggers._logging_log(this)
    assert lines[-1].startswith("KV shrink: 2 compactions")
    assert lines[-1].endswith("; phases: scoring 0.50s, move 0.25s")
    c.tier_events = 1
    this._kvs_last = c.to_dict()
    loggers._logging_log(this)
    assert lines[-1].startswith("KV shrink: 1 tier events")
    assert lines[-1].endswith("; phases: scoring 0.50s, move 0.25s")
