"""What ``vllm serve`` and ``LLM(...)`` run: the plugin's side of vLLM's engine.

Shaped like vLLM's own split:

* :mod:`.compat` -- the supported vLLM version and every engine seam patched
  (:mod:`.patches` installs them);
* :mod:`.plan` -- the one message a step's scheduler output carries to the
  workers, and the results they send back;
* :mod:`.core` -- the scheduler side: when a request is compressed and to
  what size, block bookkeeping; no tensors;
* :mod:`.worker` -- the worker side: which tokens, moving them inside vLLM's
  pages, packed blocks; no policy of its own;
* :mod:`.attention` -- attention over requests with packed blocks;
* :mod:`.metrics` -- counters in vLLM's log line and on ``/metrics``;
* :mod:`.entrypoints` -- the ``vllm`` command under the CPU wheel.

The decisions both this package and the research path make live in the
shared packages (:mod:`vllm_kvshrink.policy`, :mod:`vllm_kvshrink.methods`,
:mod:`vllm_kvshrink.storage`, :mod:`vllm_kvshrink.kernels`); the research
path, evaluation, benchmark harness and asset fetching live in
:mod:`vllm_kvshrink.lab`.  A scheduler process imports neither Triton nor
transformers (``tests/unit/test_imports.py``).
"""
