"""The rules the engine and the research path share, each in one place.

The engine's scheduler and worker (``core/``, ``worker/``, ``patches.py``) and
the transformers research path (``hf/``, ``eval/``, ``bench/``) make the same
decisions only if they compute them with the same functions.  Each module
here holds one of those rules:

* :mod:`~vllm_kvshrink.policy.cadence` -- when a request is due for an event,
  and to what size (tokens or bytes);
* :mod:`~vllm_kvshrink.policy.nbytes` -- bytes per token and per request, and
  a request's peak in blocks;
* :mod:`~vllm_kvshrink.policy.observation` -- the observation window's queries:
  their index in the cache, and the model's RoPE frequencies;
* :mod:`~vllm_kvshrink.policy.softmax` -- the window queries' attention over
  the cached keys;
* :mod:`~vllm_kvshrink.policy.record` -- the event record: build, write, read;
* :mod:`~vllm_kvshrink.policy.tokens` -- taking a request's tokens by per-row
  index (cache order, a level's tokens), the same way on both paths;
* :mod:`~vllm_kvshrink.policy.checks` -- what a configuration (global or per
  request) may not combine.

The scheduler process imports this package: no module here imports vLLM,
transformers or triton at module level.
"""
