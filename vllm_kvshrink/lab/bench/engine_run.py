"""Drive one vLLM engine through a workload, step by step, and measure it.

Run in its own process (``python -m vllm_kvshrink.lab.bench.engine_run SPEC OUT``)
because the plugin's settings are per process: the benchmark and the tests
start one process for stock vLLM and one for each compressed configuration,
on the same workload.

SPEC (JSON)::

    {"llm": {...LLM kwargs...}, "prompts": [str | {"prompt_token_ids": [...]}],
     "sampling": {...SamplingParams kwargs...},
     "per_request_extra": {index: {...kvshrink overrides...}},
     "abort_after": {index: steps}, "check_invariants": bool,
     "arrival": "all" | int (requests added per step),
     "trace_steps": bool}

Each output carries ``logprobs`` (per sampled token, ``{token id: log
probability}``) when the sampling asks for them.  With ``trace_steps`` the
result carries ``step_trace``: one
``[seconds, prefilling, running, events]`` per engine step, ``events`` being
the compression events (compactions, tier events, fallbacks) completed so
far.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

from vllm_kvshrink.policy.record import external_id


def _scheduler(llm):
    core = llm.llm_engine.engine_core
    inner = getattr(core, "engine_core", None)
    return None if inner is None else inner.scheduler


def check_invariants(scheduler) -> None:
    """Every block is owned exactly ref_cnt times; owned blocks are not free."""
    mgr = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    owners: Counter = Counter()
    for blocks in mgr.req_to_blocks.values():
        for b in blocks:
            if not b.is_null:
                owners[b.block_id] += 1
    pool = scheduler.kv_cache_manager.block_pool
    extra: Counter = Counter()
    for st in getattr(scheduler, "kvs_state", {}).values():
        for b in st.pending_cow:  # held for an in-flight copy-on-write
            extra[b.block_id] += 1
        for b in list(st.packed) + list(st.pending_fresh):  # tiered storage
            extra[b.block_id] += 1
    for block in pool.blocks:
        if block.is_null:
            continue
        n = owners[block.block_id] + extra[block.block_id]
        if n != block.ref_cnt:
            raise AssertionError(
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but {n} owners"
            )


def _events_so_far(sched) -> int:
    """Compression events completed so far (0 without the plugin)."""
    c = getattr(sched, "kvs_counters", None)
    return 0 if c is None else c.compactions + c.tier_events + c.fallbacks


def _plugin_active() -> bool:
    try:
        import vllm_kvshrink

        return vllm_kvshrink.is_active()
    except ImportError:
        return False


def _phase_seconds(counters, elapsed: float) -> dict:
    """The plugin's seconds per phase over the run, and their share of its
    wall time in steps (:mod:`~vllm_kvshrink.serving.metrics.phases`)."""
    from vllm_kvshrink.serving.metrics import phases

    return {"kvshrink_seconds": dict(counters.seconds),
            "compression_share": phases.share(counters.seconds, elapsed)}


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm_kwargs = dict(spec["llm"])
    t0 = time.perf_counter()
    llm = LLM(**llm_kwargs)
    startup = time.perf_counter() - t0
    engine = llm.llm_engine
    sched = _scheduler(llm)
    prompts = spec["prompts"]
    extra = {int(k): v for k, v in spec.get("per_request_extra", {}).items()}
    abort_after = {int(k): v for k, v in spec.get("abort_after", {}).items()}
    arrival = spec.get("arrival", "all")
    check = bool(spec.get("check_invariants")) and sched is not None

    def params(i: int):
        kw = dict(spec.get("sampling", {}))
        if i in extra:
            kw["extra_args"] = {"kvshrink": extra[i]}
        return SamplingParams(**kw)

    pending = list(range(len(prompts)))
    outputs: dict[int, dict] = {}
    preemptions: dict[str, int] = {}
    max_running = 0
    prefill_time = decode_time = 0.0
    running_trace: list[int] = []
    usage_trace: list[float] = []
    peak_usage = 0.0
    steps = 0
    aborted = []
    peak_held: dict = {}
    total_blocks = None
    if sched is not None:
        total_blocks = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    t_start = time.perf_counter()
    progress = spec.get("progress", False)
    step_trace: list | None = [] if spec.get("trace_steps") else None
    while pending or engine.has_unfinished_requests():
        n_add = len(pending) if arrival == "all" else int(arrival)
        for i in pending[:n_add]:
            engine.add_request(str(i), prompts[i], params(i))
        pending = pending[n_add:]
        prefilling = sched is not None and any(
            r.num_computed_tokens < r.num_prompt_tokens
            for r in list(sched.running) + list(sched.waiting))
        t_step = time.perf_counter()
        step_out = engine.step()
        dt = time.perf_counter() - t_step
        if prefilling:
            prefill_time += dt
        else:
            decode_time += dt
        for out in step_out:
            if out.finished:
                outputs[int(out.request_id)] = {
                    "text": out.outputs[0].text,
                    "token_ids": list(out.outputs[0].token_ids),
                    "prompt_token_ids": list(out.prompt_token_ids or []),
                }
                if out.outputs[0].logprobs:  # sampling asked for them
                    outputs[int(out.request_id)]["logprobs"] = [
                        {str(t): lp.logprob for t, lp in top.items()}
                        for top in out.outputs[0].logprobs]
        steps += 1
        for i, limit in list(abort_after.items()):
            if steps == limit and str(i) not in {str(k) for k in outputs}:
                engine.abort_request([str(i)])
                aborted.append(i)
                del abort_after[i]
        if sched is not None:
            max_running = max(max_running, len(sched.running))
            peak_usage = max(peak_usage, sched.kv_cache_manager.usage)
            running_trace.append(len(sched.running))
            usage_trace.append(round(sched.kv_cache_manager.usage, 4))
            for req_id, req in sched.requests.items():
                preemptions[req_id] = max(preemptions.get(req_id, 0), req.num_preemptions)
            if check:
                check_invariants(sched)
            held = sched.kvs_bytes_held() if hasattr(sched, "kvs_bytes_held") else {}
            if held and sum(held.values()) > sum(peak_held.values()):
                peak_held = held
        if step_trace is not None:
            step_trace.append([dt, prefilling, len(sched.running) if sched else 0,
                               _events_so_far(sched)])
        if progress and steps % 50 == 0:
            print(f"  step {steps}: {len(outputs)}/{len(prompts)} done, "
                  f"running {len(sched.running) if sched else '?'}",
                  file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_start
    result = {
        "startup_s": startup,
        "elapsed_s": elapsed,
        "steps": steps,
        "outputs": {str(k): v for k, v in sorted(outputs.items())},
        "aborted": aborted,
        "output_tokens": sum(len(o["token_ids"]) for o in outputs.values()),
        "max_running": max_running,
        "preemptions": sum(preemptions.values()),
        "preempted": {external_id(k): n for k, n in sorted(preemptions.items()) if n},
        "peak_kv_usage": peak_usage,
        "pid": os.getpid(),
        "plugin_active_here": _plugin_active(),
        "prefill_steps_s": prefill_time,
        "decode_only_steps_s": decode_time,
        "running_trace": running_trace,
        "peak_bytes_held": peak_held,
        "usage_trace": usage_trace,
    }
    result["output_tokens_per_s"] = result["output_tokens"] / max(elapsed, 1e-9)
    if step_trace is not None:
        result["step_trace"] = step_trace
    if sched is not None:
        pool = sched.kv_cache_manager.block_pool
        result["total_blocks"] = total_blocks
        result["free_blocks_end"] = pool.get_num_free_blocks()
        result["scheduler_cls"] = type(sched).__name__
        counters = getattr(sched, "kvs_counters", None)
        if counters is not None:
            result["kvshrink"] = counters.to_dict()
            # Seconds the worker spent compacting, as it last reported them.
            result["kvshrink"]["compaction_s"] = sched.kvs_worker_stats.get(
                "compaction_s", 0.0)
            result.update(_phase_seconds(counters, elapsed))
    return result


def main(argv: list[str]) -> int:
    spec_path, out_path = argv[1], argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
