"""The evaluation harness: methods x budgets x tasks on a real model and real text.

Each *cell* is one (task, method, budget): every example of the task scored
under that configuration.  A finished cell is written to
``DIR/cells/<key>.json`` and skipped when the run is repeated, so an
interrupted run resumes where it stopped.  The key holds a fingerprint of
everything that changes the numbers (model, dtype, task, chunking, seed), so a
changed setting never reuses a stale cell.

The full cache (method ``none``) is run once per example and its logits and
attention outputs are reused as the reference for every compressed run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_kvshrink.lab.eval.cells import write_atomic
from vllm_kvshrink.lab.eval.engine import run_engine_task
from vllm_kvshrink.lab.eval.presets import (
    FROZEN_ARGS,
    PRESETS,
    STORAGE_BASELINES,
    TASK_SETTINGS,
    EvalError,
    check_task,
    method_args,
    parse_row,
    row_args,
    unbudgeted,
)
from vllm_kvshrink.policy.nbytes import token_bytes

COPY_INSTRUCTION = "\n\nNow repeat the passage to remember, word for word:\n"
COPY_HEADER = "Here is a passage to remember:\n"
COPY_SEPARATOR = "\n\nSome unrelated reading follows.\n\n"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fresh_predictors(cfg) -> None:
    """A row that trains the temporal predictor online starts from a fresh
    copy of the shipped weights for every example, so a cell does not depend
    on what ran before it (and resuming is exact)."""
    if cfg.args.get("online") and "temporal" in cfg.method:
        from vllm_kvshrink.methods import temporal

        temporal._SHARED.clear()


def _safe(name: str) -> str:
    return name.replace("+", "-plus-").replace("/", "_")


class _TailLogits:
    """Wraps a causal LM for :class:`ResearchRunner`: prompt chunks return the
    last position's logits only (the others are never scored), and forward
    hooks keep each layer's attention output at the scored positions."""

    def __init__(self, model, prompt_len: int, keep_attn: bool) -> None:
        self.model = model
        self.prompt_len = prompt_len
        self.attn: list[list[torch.Tensor]] = []
        self._hooks = []
        self._scored = False
        if keep_attn:
            layers = model.model.layers
            self.attn = [[] for _ in layers]
            for i, layer in enumerate(layers):
                self._hooks.append(layer.self_attn.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def fn(module, args, output):
            if self._scored:
                out = output[0] if isinstance(output, tuple) else output
                self.attn[i].append(out[0].detach().float())
        return fn

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, position_ids, **kw):
        first = int(position_ids[0, 0])
        self._scored = first >= self.prompt_len
        if not self._scored:
            kw["logits_to_keep"] = 1
        return self.model(input_ids=input_ids, position_ids=position_ids, **kw)


@dataclasses.dataclass
class Example:
    task: str
    index: int
    prompt: list[int]
    target: list[int]
    #: copy tasks: the same prompt with another passage shown (chance level)
    control_prompt: list[int] | None = None
    info: dict = dataclasses.field(default_factory=dict)


class ResearchEvaluator:
    """Runs methods x budgets x tasks through the research path and writes
    ``results.json``, ``report.md`` and plots to ``out_dir``.

    Args:
        out_dir: results folder (``cells/`` inside holds finished cells).
        preset: ``smoke`` | ``quick`` | ``full``; the other arguments override it.
        methods: method names (``none`` is always added: it is the reference).
        budgets: budgets as fractions in (0, 1] or token counts.
        tasks: task specs (see :mod:`vllm_kvshrink.lab.eval.presets`).
        model: Hugging Face id or folder ('default': SmolLM2-135M-Instruct).
        dtype: ``float32`` | ``bfloat16``.
        seed: seeds the choice of text windows and every run.
        threads: torch CPU threads (``None``: leave as is).
        progress: print one line per cell to stderr.
    """

    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def __init__(self, out_dir: str | os.PathLike, preset: str = "quick",
                 methods: list[str] | None = None, budgets: list[float] | None = None,
                 tasks: list[dict] | None = None, model: str = "default",
                 dtype: str = "float32", seed: int = 0, threads: int | None = None,
                 progress: bool = True, plots: bool = True) -> None:
        from vllm_kvshrink.config import KVShrinkConfig
        from vllm_kvshrink.methods import available_methods

        if preset not in PRESETS:
            raise EvalError(f"preset={preset!r} is not known; allowed: {', '.join(PRESETS)}")
        p = dict(PRESETS[preset])
        self.preset = preset
        self.settings = {k: p[k] for k in ("prefill_chunk", "forced_chunk", "slack_tokens",
                                           "recent_tokens", "block_size", "n_boot")}
        methods = list(methods if methods is not None else p["methods"])
        tasks = [check_task(dict(t)) for t in (tasks if tasks is not None else p["tasks"])]
        known = available_methods()
        for m in dict.fromkeys(methods + [m for t in tasks for m in t.get("methods", [])]):
            method, storage, _ = parse_row(m)
            if method not in known:
                raise EvalError(f"methods: {m!r} is not a known method; allowed: "
                                f"{', '.join(known + list(STORAGE_BASELINES))}, "
                                f"'<method>/<forms>' or 'uniform:<form>'")
            if storage is not None or row_args(m)[1]:
                try:  # the plugin's own checks of the forms and the arguments
                    KVShrinkConfig(method=method, storage=storage or "bf16", budget=0.5,
                                   method_args=method_args(m),
                                   source={"storage": f"methods[{m!r}]",
                                           "method_args": f"methods[{m!r}]"})
                except ValueError as e:
                    raise EvalError(str(e)) from None
        self.methods = ["none"] + [m for m in dict.fromkeys(methods) if m != "none"]
        budgets = list(budgets if budgets is not None else p["budgets"])
        if not budgets:
            raise EvalError("budgets: none given; allowed: fractions in (0, 1] or token "
                            "counts >= 1")
        for b in budgets:
            try:  # the plugin's own check, with its message
                KVShrinkConfig(method="streaming", budget=b,
                               source={"budget": "budgets"})
            except ValueError as e:
                raise EvalError(str(e)) from None
        self.budgets = budgets
        self.tasks = tasks
        #: the preset's targets and Pareto rows (:mod:`.contributions`)
        self.targets = list(p.get("targets", ()))
        self.pareto = list(p.get("pareto", ()))
        names = [t["name"] for t in self.tasks]
        if len(set(names)) != len(names):
            raise EvalError(f"tasks: names must be unique; got {names}")
        if dtype not in self.DTYPES:
            raise EvalError(f"dtype={dtype!r} is not supported; allowed: "
                            f"{', '.join(self.DTYPES)}")
        self.model_name = model
        self.dtype = dtype
        self.seed = int(seed)
        self.threads = threads
        self.progress = progress
        self.plots = plots
        self.out = Path(out_dir)
        self._model = None
        self._tok = None
        self._refs: dict[tuple[str, int], dict] = {}
        self._examples: dict[str, list[Example]] = {}
        #: what the last :meth:`run` did: cells computed / reused, seconds
        self.last_run: dict[str, Any] = {}

    # ------------------------------------------------------------ plumbing
    def _log(self, msg: str) -> None:
        if self.progress:
            _say(msg)

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from vllm_kvshrink.lab.assets import resolve_model

            path = resolve_model(self.model_name)
            self._model_path = path
            self._log(f"[eval] loading {self.model_name} ({path}) in {self.dtype}")
            self._tok = AutoTokenizer.from_pretrained(path)
            self._model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.DTYPES[self.dtype]).eval()
        return self._model, self._tok

    def _fingerprint(self, task: dict) -> str:
        blob = json.dumps({"model": self.model_name, "dtype": self.dtype, "seed": self.seed,
                           "task": task, "settings": self.settings,
                           "frozen": FROZEN_ARGS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def cell_key(self, task: dict, method: str, budget) -> str:
        b = "full" if unbudgeted(method) else f"b{budget}"
        return f"{task['name']}__{_safe(method)}__{b}__{self._fingerprint(task)}"

    def cells(self) -> list[tuple[dict, str, Any]]:
        """Every (task, method, budget) of the run, full cache first."""
        out = []
        for task in self.tasks:
            # A task may name its own rows and budgets (e.g. only the
            # headline budget at the longest context, where every run is
            # expensive).
            methods = ["none"] + [m for m in task.get("methods", self.methods)
                                  if m != "none"]
            out.append((task, "none", None))
            out += [(task, m, None) for m in methods[1:] if unbudgeted(m)]
            for budget in task.get("budgets", self.budgets):
                for m in methods[1:]:
                    if unbudgeted(m):
                        continue
                    out.append((task, m, budget))
        return out

    def _settings(self, task: dict | None) -> dict:
        """The preset's settings with the task's own (:data:`TASK_SETTINGS`)."""
        own = {k: task[k] for k in TASK_SETTINGS if task and k in task}
        return {**self.settings, **own}

    def _config(self, row: str, budget, task: dict | None = None):
        from vllm_kvshrink.config import KVShrinkConfig

        s = self._settings(task)
        method, storage, _ = parse_row(row)
        return KVShrinkConfig(method=method, budget=budget if budget is not None else 1.0,
                              slack_tokens=s["slack_tokens"],
                              recent_tokens=s["recent_tokens"],
                              storage=storage or "bf16",
                              method_args=method_args(row))

    # ------------------------------------------------------------ examples
    def examples(self, task: dict) -> list[Example]:
        if task["name"] not in self._examples:
            rng = np.random.default_rng([self.seed, zlib.crc32(task["name"].encode())])
            if task["kind"] == "ppl":
                ex = self._austen_examples(task, rng)
            else:
                ex = self._copy_examples(task, rng)
            self._examples[task["name"]] = ex
        return self._examples[task["name"]]

    def _tokens(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def _austen_examples(self, task: dict, rng) -> list[Example]:
        from vllm_kvshrink.lab.assets import load_austen, load_essays

        self._load()
        if task.get("corpus", "austen") == "essays":
            # One long text of the essays, in their stored order.
            books = {"essays": "\n\n".join(load_essays())}
        else:
            books = load_austen()
        titles = list(books)
        need = task["context"] + task["continuation"]
        out = []
        for i in range(task["examples"]):
            title = titles[i % len(titles)]
            text = books[title]
            chars = need * 8
            if len(text) < chars:
                raise EvalError(f"task {task['name']!r}: context+continuation={need} "
                                f"tokens is longer than {title!r}")
            start = int(rng.integers(0, len(text) - chars))
            start = text.find("\n", start) + 1  # begin at a line start
            ids = self._tokens(text[start:start + chars])[:need]
            if len(ids) < need:
                raise EvalError(f"task {task['name']!r}: window of {title!r} at "
                                f"{start} has only {len(ids)} tokens, need {need}")
            out.append(Example(task["name"], i, ids[:task["context"]],
                               ids[task["context"]:], info={"book": title,
                                                            "char_offset": start}))
        return out

    def _copy_examples(self, task: dict, rng) -> list[Example]:
        from vllm_kvshrink.lab.assets import load_essays

        self._load()
        essays = [self._tokens(e) for e in load_essays()]
        long_enough = [i for i, e in enumerate(essays) if len(e) >= task["passage"] + 200]
        out = []
        n_p, n_f = task["passage"], task["filler"]
        header, sep, instr = (self._tokens(COPY_HEADER), self._tokens(COPY_SEPARATOR),
                              self._tokens(COPY_INSTRUCTION))
        for i in range(task["examples"]):
            src, ctl = rng.choice(long_enough, size=2, replace=False)
            a = int(rng.integers(100, len(essays[src]) - n_p))
            b = int(rng.integers(100, len(essays[ctl]) - n_p))
            passage = essays[src][a:a + n_p]
            other = essays[ctl][b:b + n_p]
            pool = [j for j in range(len(essays)) if j not in (src, ctl)]
            order = rng.permutation(pool)
            filler: list[int] = []
            for j in order:
                filler.extend(essays[int(j)])
                if len(filler) >= n_f:
                    break
            filler = filler[:n_f]
            prompt = header + passage + sep + filler + instr
            control = header + other + sep + filler + instr
            out.append(Example(task["name"], i, prompt, passage, control,
                               info={"essay": int(src), "token_offset": a,
                                     "control_essay": int(ctl)}))
        return out

    # ------------------------------------------------------------ one run
    def _runner(self, wrapped, method: str, budget, shared: bool, task: dict | None = None):
        from vllm_kvshrink.lab.hf.research import ResearchRunner

        s = self._settings(task)
        store = parse_row(method)[2]
        cfg = self._config(method, budget, task)
        _fresh_predictors(cfg)
        return ResearchRunner(wrapped, cfg,
                              block_size=s["block_size"],
                              chunk=None if shared else s["prefill_chunk"],
                              store_form=store,
                              store_from="prefill_end" if shared else "write")

    def _prefill(self, prompt: list[int]):
        """The prompt's full-cache state, shared by every row of an example."""
        model, _ = self._load()
        torch.manual_seed(self.seed)
        wrapped = _TailLogits(model, len(prompt), False)
        return self._runner(wrapped, "none", None, True).prefill(prompt)

    def _run_one(self, method: str, budget, prompt: list[int], target: list[int],
                 keep_attn: bool, prefill=None, task: dict | None = None) -> dict:
        model, _ = self._load()
        torch.manual_seed(self.seed)
        s = self._settings(task)
        wrapped = _TailLogits(model, len(prompt), keep_attn)
        try:
            runner = self._runner(wrapped, method, budget, prefill is not None, task)
            res = runner.run(prompt, forced=target, keep_logits=True,
                             forced_chunk=s["forced_chunk"], prefill=prefill)
        finally:
            wrapped.close()
        c = len(target)
        logits = res.logits[-c - 1:-1].float()  # row j predicts target[j]
        logp = torch.log_softmax(logits, dim=-1)
        attn = [torch.cat(a)[:c] for a in wrapped.attn] if keep_attn else None
        # Bytes as vLLM would hold them (16-bit elements, forms at their
        # exact bytes), against the 16-bit full cache.
        kv = np.asarray(res.kv_bytes, dtype=float)
        full = np.asarray(res.full_kv_bytes, dtype=float)
        out = {"logp": logp, "attn": attn,
               "kv_mean_ratio": float(np.mean(kv / full)),
               "kv_peak_ratio": float(kv.max() / full.max()),
               "kv_peak_bytes": int(kv.max()), "full_kv_bytes": int(full.max()),
               "events": len(res.events), "merged_tokens": int(res.merged_tokens),
               "stats": res.stats}
        if res.offload_bytes:  # promotion: the offload copy, apart
            off = np.asarray(res.offload_bytes, dtype=float)
            hkv, _, d = res.cache.keys[0].shape
            token = token_bytes(len(res.cache.keys) * hkv, d)  # one token's bf16 K+V
            st = res.stats["offload"]
            out["offload_mean_ratio"] = float(np.mean(off / full))
            out["offload_peak_bytes"] = int(off.max())
            out["promoted_per_token"] = st["promoted_bytes"] / c / token
            out["scan_per_token"] = st["scan_bytes"] / c / token
            out["offload_stats"] = st
        return out

    @staticmethod
    def _score(run: dict, ref: dict, target: list[int], kind: str) -> dict:
        tgt = torch.tensor(target)
        logp = run["logp"]
        rows = torch.arange(len(target))
        out = {}
        if kind == "ppl":
            out["nll"] = float(-logp[rows, tgt].mean())
        else:
            out["copy_acc"] = float((logp.argmax(-1) == tgt).float().mean())
        ref_lp = ref["logp"]
        out["top1_agree"] = float((logp.argmax(-1) == ref_lp.argmax(-1)).float().mean())
        kl = (ref_lp.exp() * (ref_lp - logp)).sum(-1).clamp_min(0.0)
        out["kl"] = float(kl.mean())
        per_layer = [float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
                     for a, b in zip(run["attn"], ref["attn"])]
        out["attn_cos"] = float(np.mean(per_layer))
        out["attn_cos_per_layer"] = [round(x, 6) for x in per_layer]
        for k in ("kv_mean_ratio", "kv_peak_ratio", "kv_peak_bytes", "full_kv_bytes",
                  "events", "merged_tokens", "offload_mean_ratio", "offload_peak_bytes",
                  "promoted_per_token", "scan_per_token", "offload_stats"):
            if k in run:
                out[k] = run[k]
        if "adaptive" in run["stats"]:  # its choices per candidate
            out["adaptive"] = run["stats"]["adaptive"]
        pred = run["stats"].get("predictor")
        if pred:
            out["predictor"] = pred
        return out

    def _reference(self, task: dict, ex: Example) -> dict:
        key = (task["name"], ex.index)
        if key not in self._refs:
            self._refs[key] = self._run_one("none", None, ex.prompt, ex.target, True,
                                            task=task)
        return self._refs[key]

    def _run_cell(self, task: dict, method: str, budget) -> dict:
        kind = task["kind"]
        exs = self.examples(task)
        rows = []
        for ex in exs:
            ref = self._reference(task, ex)
            run = ref if method == "none" else self._run_one(method, budget, ex.prompt,
                                                             ex.target, True, task=task)
            row = {"index": ex.index, **ex.info, "prompt_tokens": len(ex.prompt),
                   "scored_tokens": len(ex.target), **self._score(run, ref, ex.target, kind)}
            if method == "none" and kind == "copy":
                ctl = self._run_one("none", None, ex.control_prompt, ex.target, False)
                row["control_copy_acc"] = float(
                    (ctl["logp"].argmax(-1) == torch.tensor(ex.target)).float().mean())
            rows.append(row)
        return {"task": task["name"], "kind": kind, "method": method, "budget": budget,
                "examples": rows}

    def _shared_cells(self, task: dict, rows: list[tuple[str, Any]], cells_dir: Path,
                      label: str) -> tuple[list[dict], int, int]:
        """A task whose rows all continue from one shared prefill: example by
        example (one prompt pass each, only if some row is missing), every
        missing row scored and added to the example's file in ``cells/``, so
        an interrupted run resumes there and a run with more rows reuses the
        ones it has; then one cell per row, as for the other tasks."""
        exs = self.examples(task)
        # Example i is the same window whatever the example count, so the
        # count stays out of the fingerprint: a run with fewer examples
        # reuses the files of a longer one.
        base = {k: v for k, v in task.items() if k not in ("examples", "methods",
                                                           "budgets")}
        fp = self._fingerprint(base)
        per_row: dict[tuple[str, Any], list[dict]] = {r: [] for r in rows}
        computed = reused = 0
        for ex in exs:
            path = cells_dir / f"{task['name']}__example{ex.index}__{fp}.json"
            t0 = time.perf_counter()
            got = (json.loads(path.read_text()) if path.exists()
                   else self._legacy_example(cells_dir, base, ex.index))
            have = {(r["method"], r["budget"]) for r in got["rows"]}
            missing = [r for r in rows if r not in have]
            if missing:
                pre = self._prefill(ex.prompt)
                ref = self._run_one("none", None, ex.prompt, ex.target, True, pre, task)
                for method, budget in missing:
                    run = ref if method == "none" else self._run_one(
                        method, budget, ex.prompt, ex.target, True, pre, task)
                    got["rows"].append({
                        "method": method, "budget": budget,
                        "row": {"index": ex.index, **ex.info,
                                "prompt_tokens": len(ex.prompt),
                                "scored_tokens": len(ex.target),
                                **self._score(run, ref, ex.target, task["kind"])}})
                    write_atomic(path, got)  # row by row: resumable
                del pre, ref
                computed += 1
            else:
                reused += 1
            for r in got["rows"]:
                if (r["method"], r["budget"]) in per_row:
                    per_row[(r["method"], r["budget"])].append(r["row"])
            self._log(f"{label}: example {ex.index + 1}/{len(exs)}, {len(missing)} rows "
                      f"run ({time.perf_counter() - t0:.1f} s)")
        cells = [{"task": task["name"], "kind": task["kind"], "method": m, "budget": b,
                  "examples": per_row[(m, b)], "key": f"{task['name']}__{_safe(m)}__{b}__{fp}"}
                 for m, b in rows]
        return cells, computed, reused

    def _legacy_example(self, cells_dir: Path, base: dict, index: int) -> dict:
        """An example file of the earlier layout (its fingerprint also held
        its list of rows), adopted when that fingerprint checks out for this
        task and these settings; else no rows."""
        for old in sorted(cells_dir.glob(f"{base['name']}__example{index}__*.json")):
            got = json.loads(old.read_text())
            rows = [[r["method"], r["budget"]] for r in got.get("rows", [])]
            if old.stem.rsplit("__", 1)[1] == self._fingerprint({**base, "rows": rows}):
                return got
        return {"rows": []}

    # ------------------------------------------------------------ the run
    def run(self) -> dict:
        """Run every unfinished cell, then write results.json, report.md, plots.
        Returns the results dict."""
        from vllm_kvshrink.lab.eval.report import build_results, write_outputs

        t_start = time.perf_counter()
        if self.threads:
            torch.set_num_threads(self.threads)
        cells_dir = self.out / "cells"
        cells_dir.mkdir(parents=True, exist_ok=True)
        shared = [t for t in self.tasks if t.get("shared_prefill")]
        plan = [t for t in self.cells() if t[0]["kind"] != "engine_copy"
                and not t[0].get("shared_prefill")]
        engine_tasks = [t for t in self.tasks if t["kind"] == "engine_copy"]
        done: list[dict] = []
        computed = reused = 0
        total = len(plan) + len(engine_tasks) + len(shared)
        for j, task in enumerate(shared, 1):
            rows = [(m, b) for t, m, b in self.cells() if t is task]
            cells, c, r = self._shared_cells(task, rows, cells_dir,
                                             f"[eval {j}/{total}] {task['name']} "
                                             f"({len(rows)} rows)")
            done.extend(cells)
            computed += c
            reused += r
        for n, (task, method, budget) in enumerate(plan, len(shared) + 1):
            key = self.cell_key(task, method, budget)
            path = cells_dir / f"{key}.json"
            label = (f"[eval {n}/{total}] {task['name']} {method}"
                     f"{'' if budget is None else f' budget={budget}'}")
            if path.exists():
                done.append(json.loads(path.read_text()))
                reused += 1
                self._log(f"{label}: finished earlier, reused")
                continue
            t0 = time.perf_counter()
            cell = self._run_cell(task, method, budget)
            cell["key"] = key
            cell["seconds"] = round(time.perf_counter() - t0, 2)
            write_atomic(path, cell)
            done.append(cell)
            computed += 1
            self._log(f"{label}: {_headline(cell)} ({cell['seconds']:.1f} s)")
        for j, task in enumerate(engine_tasks, len(plan) + 1):
            cells, c, r = run_engine_task(self, task, cells_dir,
                                          f"[eval {j}/{total}] {task['name']}")
            done.extend(cells)
            computed += c
            reused += r
        results = build_results(self, done, time.perf_counter() - t_start)
        write_outputs(self, results)
        self.last_run = {"computed": computed, "reused": reused,
                         "seconds": time.perf_counter() - t_start}
        self._log(f"[eval] {computed} cells computed, {reused} reused; wrote "
                  f"{self.out / 'results.json'}, {self.out / 'report.md'} "
                  f"({self.last_run['seconds']:.1f} s)")
        return results


def _headline(cell: dict) -> str:
    rows = cell["examples"]
    parts = []
    for k in ("nll", "copy_acc", "top1_agree", "kl", "kv_mean_ratio"):
        vals = [r[k] for r in rows if k in r]
        if vals:
            parts.append(f"{k}={np.mean(vals):.3f}")
    if rows and "control_copy_acc" in rows[0]:
        parts.append(f"control={np.mean([r['control_copy_acc'] for r in rows]):.3f}")
    return " ".join(parts)
