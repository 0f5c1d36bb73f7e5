"""CPU attention backend that also keeps the observation window of queries.

vLLM's CPU kernels return no attention probabilities, so attention-based
methods (SnapKV and friends) score the cache themselves from the most recent
queries of each layer.  This backend runs the stock kernel unchanged and then
copies the rows the worker asked for (a few per request per step) into a ring
buffer -- a bounded cost of ``O(window)`` rows per request per layer.

What to do in a step comes from the worker's
:class:`~vllm_kvshrink.serving.worker.step_context.StepContext`, carried on the
step's attention metadata; a forward pass without one runs as stock.  The
seconds of both additions go to the context's timing sink (``perf_counter``
only: no synchronization, nothing allocated).
"""

from __future__ import annotations

import time

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_kvshrink.serving.worker import step_context
from vllm_kvshrink.serving.worker.step_context import StepContext


class KVShrinkCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata,
                              output, *args, **kwargs)
        step = step_context.of(attn_metadata) if attn_metadata is not None else None
        if step is None:
            return out
        num_tokens = attn_metadata.num_actual_tokens
        if step.packed is not None:
            t0 = time.perf_counter()
            _attend_packed(step, self, query, kv_cache, output, num_tokens)
            step.timing("packed_attention", time.perf_counter() - t0)
        if step.capture is not None:
            t0 = time.perf_counter()
            step.capture(getattr(layer, "layer_name", ""), query[:num_tokens])
            step.timing("capture", time.perf_counter() - t0)
        return out


def _attend_packed(step: StepContext, impl, query, kv_cache, output, num_tokens) -> None:
    """Requests with packed blocks: the stock kernel was given a sequence of
    their query rows only (``runner_patch._attend_once``: a few slots read,
    not their plain row); their rows of ``output`` (``[T, Hq * D]``) are
    replaced by attention over plain and packed tokens together
    (:mod:`vllm_kvshrink.kernels.packed_attention`)."""
    from vllm_kvshrink.kernels.packed_attention import packed_attention_into

    hq, d = impl.num_heads, impl.head_size
    q = query[:num_tokens].view(num_tokens, hq, d)
    out = output[:num_tokens].view(num_tokens, hq, d)
    packed_attention_into(q, kv_cache, step.packed_layout, step.packed, impl.scale, out)


class KVShrinkCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KVShrinkCPUAttentionBackendImpl

