"""The laboratory: what measures the plugin rather than serves it.

* :mod:`.hf` -- the research path (the same methods and policy on a
  transformers model) and the replays the engine tests compare with;
* :mod:`.eval` -- the evaluation harness (presets, cells, paired statistics,
  reports);
* :mod:`.bench` -- the benchmark and test harness around real engines and
  servers (engine runs, the fork server, soak clients);
* :mod:`.assets` -- the embedded model and texts, fetched from registry
  packages;
* :mod:`.kernels` -- kernels kept for measurement and for later wiring.

Nothing in :mod:`vllm_kvshrink.serving` or the shared packages imports the
lab; it imports from them, never the other way round.
"""
