"""CPU attention backend that also keeps the observation window of queries.

vLLM's CPU kernels return no attention probabilities, so attention-based
methods (SnapKV and friends) score the cache themselves from the most recent
queries of each layer.  This backend runs the stock kernel unchanged and then
copies the rows the worker asked for (a few per request per step) into a ring
buffer -- a bounded cost of ``O(window)`` rows per request per layer.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
)

from vllm_kvshrink.worker import state


class KVShrinkCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata,
                              output, *args, **kwargs)
        comp = state.COMPACTOR
        if comp is not None and comp.capture is not None and attn_metadata is not None:
            comp.capture_queries(
                getattr(layer, "layer_name", ""), query[: attn_metadata.num_actual_tokens]
            )
        return out


class KVShrinkCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KVShrinkCPUAttentionBackendImpl
