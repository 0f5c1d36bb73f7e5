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
        if comp is not None and comp.packed_batch is not None and attn_metadata is not None:
            _attend_packed(comp, self, query, kv_cache, output,
                           attn_metadata.num_actual_tokens)
        if comp is not None and comp.capture is not None and attn_metadata is not None:
            comp.capture_queries(
                getattr(layer, "layer_name", ""), query[: attn_metadata.num_actual_tokens]
            )
        return out


def _attend_packed(comp, impl, query, kv_cache, output, num_tokens) -> None:
    """Requests with packed blocks: the stock kernel saw their plain rows
    only; their rows of ``output`` are replaced by attention over plain and
    packed tokens together (:mod:`vllm_kvshrink.kernels.packed_attention`)."""
    from vllm_kvshrink.kernels.packed_attention import packed_attention

    batch = comp.packed_batch
    hq, d = impl.num_heads, impl.head_size
    q = query[:num_tokens].view(num_tokens, hq, d)
    rows = packed_attention(q, kv_cache, comp.attention_layout(), batch, impl.scale)
    idx = batch.row_index()
    out = output[:num_tokens].view(num_tokens, hq, d)
    out.index_copy_(0, idx, rows.to(out.dtype))


class KVShrinkCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KVShrinkCPUAttentionBackendImpl
