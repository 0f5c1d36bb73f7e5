"""Compression counters, kept by the scheduler and shipped with the engine stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: Key under which the counters travel inside ``SchedulerStats.kv_connector_stats``.
STATS_KEY = "kvshrink"


@dataclass
class Counters:
    compactions: int = 0  # compaction events that completed
    tokens_evicted: int = 0  # cached tokens removed by those events
    blocks_freed: int = 0  # blocks returned to vLLM's pool by those events
    fallbacks: int = 0  # compactions that failed and left the request uncompressed
    cow_blocks: int = 0  # shared blocks copied before being rewritten
    tokens_merged: int = 0  # evicted tokens folded into kept ones (semantic)
    predictor_updates: int = 0  # online training steps of the temporal predictor
    tier_events: int = 0  # tier-policy events that completed (tiered storage)
    tokens_demoted: int = 0  # tokens moved to a form with fewer bytes by them
    ring_misses: int = 0  # steps a request found no query-ring slot (worker)
    #: cumulative seconds per phase of the plugin's work (the worker's as it
    #: last reported them, and ``scheduler``; see
    #: :mod:`~vllm_kvshrink.serving.metrics.phases`)
    seconds: dict = field(default_factory=dict)
    # the temporal predictor's accuracy on the labels seen so far (-1: none yet)
    predictor_recall: float = -1.0  # recall@10% of next-window attention
    predictor_spearman: float = -1.0  # rank correlation with it
    # gauges, refreshed every step
    #: learned components (temporal predictor, semantic embedding) whose
    #: weights were not trained on the served model (random or another model's)
    foreign_weights: int = 0
    logical_tokens: int = 0  # tokens of running compressed-capable requests
    physical_tokens: int = 0  # of which are still in the cache
    #: bytes held by running requests' KV per storage form (the plain form,
    #: named ``bf16``, at the cache's element size: 2 bytes in a bf16 cache, 4
    #: in a float32 one; packed forms at their codes + parameters)
    bytes_held: dict = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Logical / physical tokens of running requests (1.0 = no saving)."""
        if self.physical_tokens <= 0:
            return 1.0
        return self.logical_tokens / self.physical_tokens

    #: bytes the running requests' logical tokens would hold uncompressed, at
    #: the cache's element size
    logical_bytes: int = 0

    @property
    def bytes_ratio(self) -> float:
        """Uncompressed bytes of the logical tokens / bytes held (1.0 = no
        saving)."""
        held = sum(self.bytes_held.values())
        if held <= 0:
            return 1.0
        return self.logical_bytes / held

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_ratio"] = self.compression_ratio
        d["bytes_ratio"] = self.bytes_ratio
        return d
