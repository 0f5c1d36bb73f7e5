"""Hot-path kernels: compaction, merging, quantization and scoring of paged
KV caches.

Each op is a Triton kernel (:mod:`.triton_kernels`) behind a host wrapper that
checks its arguments (:mod:`.ops`), registered as a ``kvshrink::`` torch
custom op with a fake implementation, and has a plain PyTorch twin in
:mod:`.reference`.  CUDA versions of compaction and quantization live in
``csrc/`` (:mod:`.cuda_ext`).  Importing this package needs torch and triton
only (no vLLM).
"""

from vllm_kvshrink.kernels.layouts import LAYOUTS, kv_views, layout_from_kind, stack_layers
from vllm_kvshrink.kernels.ops import (
    Quantized,
    compact_kv,
    dequantize,
    kivi_quantize,
    merge_kv,
    pool_scores,
    quantize,
    window_scores,
)

__all__ = [
    "LAYOUTS",
    "Quantized",
    "compact_kv",
    "dequantize",
    "kivi_quantize",
    "kv_views",
    "layout_from_kind",
    "merge_kv",
    "pool_scores",
    "quantize",
    "stack_layers",
    "window_scores",
]
