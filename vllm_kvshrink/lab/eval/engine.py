"""Copy-back served by the real vLLM engine with the plugin.

One engine run (a subprocess, :func:`vllm_kvshrink.lab.bench.launch.run_engine`)
serves every unfinished (method, budget) x example as its own request; each
request picks its method and budget through ``per_request_extra``.  Greedy
generation of as many tokens as the passage holds plus a few, scored by the
longest common subsequence of generated and passage tokens over the passage
length (ROUGE-L recall on tokens): the model often opens its copy with a
newline or a capital letter, which a position-by-position match would count as
a total failure.  Research-only
methods (MiniCache) are not servable and are left out of this task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vllm_kvshrink.lab.eval.cells import write_atomic
from vllm_kvshrink.lab.eval.presets import method_args


def lcs_recall(generated: list[int], reference: list[int]) -> float:
    """Longest common subsequence of the two token lists / ``len(reference)``."""
    if not reference:
        raise ValueError("lcs_recall needs a non-empty reference")
    prev = [0] * (len(reference) + 1)
    for g in generated:
        cur = [0]
        for j, r in enumerate(reference):
            cur.append(prev[j] + 1 if g == r else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(reference)


def run_engine_task(ev, task: dict, cells_dir: Path, label: str):
    from vllm_kvshrink.lab.eval.presets import STORAGE_BASELINES, unbudgeted
    from vllm_kvshrink.methods import is_servable

    exs = ev.examples(task)
    budgets = task.get("budgets", ev.budgets)
    wanted = [("none", None)]
    # vLLM's CPU backend serves fp8 of its own formats; tiered and uniform
    # rows of ours run in the research path only in this version.
    wanted += [(m, None) for m in ev.methods[1:] if m in STORAGE_BASELINES and m == "fp8"]
    wanted += [(m, b) for b in budgets for m in ev.methods[1:]
               if not unbudgeted(m) and "/" not in m and is_servable(m)]
    cells, todo = [], []
    for m, b in wanted:
        key = ev.cell_key(task, m, b) + "__engine"
        path = cells_dir / f"{key}.json"
        if path.exists():
            cells.append(json.loads(path.read_text()))
        else:
            todo.append((m, b, key, path))
    reused = len(cells)
    if not todo:
        ev._log(f"{label}: {reused} engine cells finished earlier, reused")
        return cells, 0, reused
    # One engine run per KV storage dtype: stock (plus every method, each
    # request picking its own), and each storage baseline as stock vLLM with
    # that kv_cache_dtype.
    groups: dict[str, list] = {}
    for item in todo:
        groups.setdefault(item[0] if item[0] in STORAGE_BASELINES else "auto",
                          []).append(item)
    for kv_dtype, group in groups.items():
        cells += _serve(ev, task, exs, group, kv_dtype, budgets, label)
    return cells, len(todo), reused


def _serve(ev, task, exs, todo, kv_dtype: str, budgets, label: str) -> list[dict]:
    from vllm_kvshrink.lab.bench.launch import run_engine

    s = ev.settings
    prompts, extra, index = [], {}, []
    for m, b, key, _ in todo:
        for ex in exs:
            i = len(prompts)
            prompts.append({"prompt_token_ids": ex.prompt})
            extra[str(i)] = ({"method": "none"} if m == "none" or kv_dtype != "auto" else
                             {"method": m, "budget": b, "method_args": method_args(m)})
            index.append((key, ex.index, False))
            if m == "none":  # chance level: the same prompt with another passage
                prompts.append({"prompt_token_ids": ex.control_prompt})
                extra[str(len(prompts) - 1)] = {"method": "none"}
                index.append((key, ex.index, True))
    longest = max(len(ex.prompt) for ex in exs) + task["passage"] + 16
    spec = {
        "llm": dict(model=ev._model_path, dtype=ev.dtype, max_model_len=longest,
                    kv_cache_memory_bytes=512 << 20, block_size=s["block_size"],
                    max_num_seqs=8, enforce_eager=True, seed=ev.seed,
                    enable_prefix_caching=False, kv_cache_dtype=kv_dtype,
                    max_num_batched_tokens=s["prefill_chunk"]),
        "prompts": prompts, "per_request_extra": extra,
        "sampling": {"max_tokens": task["passage"] + 8, "temperature": 0.0,
                     "ignore_eos": True},
    }
    env = ({"VLLM_KVSHRINK_METHOD": "none"} if kv_dtype != "auto" else
           {"VLLM_KVSHRINK_METHOD": "snapkv", "VLLM_KVSHRINK_BUDGET": str(budgets[0]),
            "VLLM_KVSHRINK_SLACK_TOKENS": str(s["slack_tokens"]),
            "VLLM_KVSHRINK_RECENT_TOKENS": str(s["recent_tokens"]),
            "VLLM_KVSHRINK_STRICT": "1"})
    if kv_dtype != "auto":
        spec["per_request_extra"] = {}
    ev._log(f"{label}: one engine run (kv_cache_dtype={kv_dtype}), {len(prompts)} "
            f"requests ({len(todo)} method/budget cells x {len(exs)} examples)")
    t0 = time.perf_counter()
    out = run_engine(spec, env)
    seconds = time.perf_counter() - t0
    rows: dict[str, list] = {key: [] for _, _, key, _ in todo}
    controls = {}
    for i, (key, ex_i, control) in enumerate(index):
        gen = out["outputs"][str(i)]["token_ids"]
        ref = exs[ex_i].target
        if control:
            controls[ex_i] = lcs_recall(gen, ref)
            continue
        rows[key].append({"index": ex_i, **exs[ex_i].info, "prompt_tokens":
                          len(exs[ex_i].prompt), "scored_tokens": len(ref),
                          "copy_acc": lcs_recall(gen, ref),
                          "generated_text": ev._tok.decode(gen)[:300]})
    for m, _, key, _ in todo:
        if m == "none":
            for row in rows[key]:
                row["control_copy_acc"] = controls[row["index"]]
    cells = []
    for m, b, key, path in todo:
        cell = {"task": task["name"], "kind": task["kind"], "method": m, "budget": b,
                "examples": rows[key], "key": key, "engine": True,
                "kv_cache_dtype": kv_dtype,
                "seconds": round(seconds / len(todo), 2)}
        write_atomic(path, cell)
        cells.append(cell)
    ev._log(f"{label}: engine served {len(prompts)} requests in {seconds:.1f} s "
            f"(startup {out.get('startup_s', 0):.1f} s)")
    return cells
