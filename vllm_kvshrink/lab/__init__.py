"""Code the serving path does not run: kernels kept for measurement and for
later wiring (:mod:`.kernels`).  Nothing outside the lab, the benchmarks and
the tests imports it; it imports from the runtime packages, never the other
way round.
"""
