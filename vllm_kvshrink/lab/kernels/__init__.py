"""Kernels the engine does not call, beside the runtime kernels of
:mod:`vllm_kvshrink.kernels`:

* :mod:`.ops`: compaction (``compact_kv``), merging (``merge_kv``), window
  scoring (``window_scores``, ``pool_scores``) and KIVI's quantization
  (``kivi_quantize``) -- host wrappers and ``kvshrink::`` custom ops;
* :mod:`.triton_kernels`: their ``@triton.jit`` kernels only;
* :mod:`.reference`: their PyTorch twins;
* :mod:`.cuda_ext`: CUDA versions of compaction and quantization (``csrc/``).

Importing this package needs torch and triton only (no vLLM).
"""
