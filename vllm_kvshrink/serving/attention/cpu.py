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

import logging
import time

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

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


logger = logging.getLogger("vllm.kvshrink")

#: vLLM's ISA for bf16 on CPUs with AMX tiles packs each block in VNNI pairs
#: of 16-token tiles; compaction reads and moves tokens in any layout (index
#: maps), but the packed-block kernel and the strided fast paths know the
#: "vec" layouts only, so a compressing engine runs vLLM's "vec" kernel there
NO_STRIDED_FORM_ISAS = {"amx": "vec"}


class KVShrinkCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.isa in NO_STRIDED_FORM_ISAS:
            chosen, self.isa = self.isa, NO_STRIDED_FORM_ISAS[self.isa]
            self._set_isa_to_layers(layer_names)
            logger.warning(
                "KV shrink: vLLM chose its %r attention ISA, whose in-block layout the "
                "plugin's packed-block kernel cannot read; the compressing engine "
                "runs vLLM's %r ISA instead (bf16 attention without AMX tiles: "
                "slower, and equal to stock up to rounding)", chosen, self.isa)


class KVShrinkCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KVShrinkCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls():
        return KVShrinkCPUAttentionMetadataBuilder
