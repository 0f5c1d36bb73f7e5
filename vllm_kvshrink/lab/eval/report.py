"""Summaries, paired comparisons, ``results.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from vllm_kvshrink.lab.eval import stats
from vllm_kvshrink.lab.eval.presets import BASELINES, METRICS, PRIMARY, unbudgeted

#: Copy-back is informative only where the full cache beats the control
#: prompt (passage not shown) by at least this much accuracy.
ABOVE_CHANCE_MARGIN = 0.15


def _summary(cell: dict, n_boot: int, seed: int) -> dict:
    out = {}
    rows = cell["examples"]
    for metric in list(METRICS) + ["control_copy_acc"]:
        vals = [r[metric] for r in rows if metric in r]
        if vals:
            out[metric] = stats.bootstrap_ci(vals, n_boot=n_boot, seed=seed)
    return out


def build_results(ev, cells: list[dict], seconds: float) -> dict:
    import torch
    import transformers

    n_boot = ev.settings["n_boot"]
    for c in cells:
        c["summary"] = _summary(c, n_boot, ev.seed)
    by = {(c["task"], c["method"], c["budget"]): c for c in cells}
    chance = {}
    comparisons = []
    for task in ev.tasks:
        name, kind = task["name"], task["kind"]
        full = by.get((name, "none", None))
        if kind in ("copy", "engine_copy") and full is not None:
            f = full["summary"]["copy_acc"]["mean"]
            ctl = full["summary"].get("control_copy_acc", {}).get("mean")
            chance[name] = {"full_cache": f, "control": ctl,
                            "above_chance": None if ctl is None else
                            bool(f - ctl >= ABOVE_CHANCE_MARGIN),
                            "margin": ABOVE_CHANCE_MARGIN}
        metric_names = [PRIMARY[kind][0]] + (["top1_agree", "kl"] if kind != "engine_copy"
                                             else [])
        # Storage baselines (full cache in fewer bits) against the full cache,
        # once per task; compressed methods meet them per budget below.
        for m in ev.methods:
            if unbudgeted(m) and m != "none" and (name, m, None) in by and full:
                for metric in metric_names[:1]:
                    x = [r[metric] for r in by[(name, m, None)]["examples"]]
                    y = [r[metric] for r in full["examples"]]
                    if len(x) == len(y):
                        comparisons.append({
                            "task": name, "budget": None, "method": m, "baseline": "none",
                            "metric": metric, "higher_is_better": METRICS[metric],
                            **stats.compare(x, y, METRICS[metric], n_boot=n_boot,
                                            seed=ev.seed)})
        for budget in task.get("budgets", ev.budgets):
            present = [m for m in dict.fromkeys(["none"] + task.get("methods", ev.methods))
                       if (name, m, None if unbudgeted(m) else budget) in by]
            for m in present:
                if unbudgeted(m):
                    continue
                mc = by[(name, m, budget)]
                for base in BASELINES:
                    if base == m or base not in present:
                        continue
                    bc = by[(name, base, None if unbudgeted(base) else budget)]
                    for metric in metric_names:
                        if base == "none" and metric in ("top1_agree", "kl"):
                            continue  # fixed by definition for the full cache
                        x = [r[metric] for r in mc["examples"]]
                        y = [r[metric] for r in bc["examples"]]
                        if len(x) != len(y):
                            continue
                        res = stats.compare(x, y, METRICS[metric], n_boot=n_boot,
                                            seed=ev.seed)
                        comparisons.append({"task": name, "budget": budget, "method": m,
                                            "baseline": base, "metric": metric,
                                            "higher_is_better": METRICS[metric], **res})
    return {
        "meta": {
            "preset": ev.preset, "model": ev.model_name,
            "model_path": getattr(ev, "_model_path", None), "dtype": ev.dtype,
            "seed": ev.seed, "budgets": ev.budgets,
            "methods": list(dict.fromkeys(ev.methods + [m for t in ev.tasks
                                                        for m in t.get("methods", [])])),
            "settings": ev.settings, "learned_methods_frozen": True,
            "targets": getattr(ev, "targets", []), "pareto": getattr(ev, "pareto", []),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 2),
            "machine": _machine(),
            "command": "python -m vllm_kvshrink.lab.eval " + " ".join(sys.argv[1:])
            if sys.argv and sys.argv[0].endswith("__main__.py") else "ResearchEvaluator",
        },
        "tasks": ev.tasks, "chance": chance, "cells": cells, "comparisons": comparisons,
    }


def _machine() -> str:
    from vllm_kvshrink.lab.bench.machine import cpu_model

    cpu = cpu_model() or platform.processor() or platform.machine()
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), no GPU used"


def _fmt(s: dict | None, digits: int = 3) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def _p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    cells = results["cells"]
    lines = [f"# KV-cache compression evaluation ({meta['preset']} preset)", "",
             f"Command: `{meta.get('command', '')}`  ",
             f"Machine: {meta.get('machine', '')}; written {meta['written']}.", "",
             f"Model `{meta['model']}` ({meta['dtype']})"
             + (" -- the embedded SmolLM2-135M-Instruct, a Q4_1 GGUF dequantized, "
                "not the original checkpoint" if meta['model'] == "default" else "")
             + f", seed {meta['seed']}, "
             f"budgets {meta['budgets']}, settings {json.dumps(meta['settings'])}; "
             f"research path (transformers {meta['transformers']}, torch "
             f"{meta['torch']}, {meta['torch_threads']} threads); {meta['seconds']:.0f} s.",
             "Learned methods (temporal, semantic) ran with their shipped weights frozen, "
             "except rows marked `online=true`: the temporal predictor trained while the "
             "row ran, from a fresh copy of the shipped weights for every example. "
             "`[offload=f]` rows promote from an offload copy of up to f of the tokens "
             "(vllm_kvshrink/lab/hf/offload.py), held apart from the resident bytes. "
             "MiniCache merges adjacent deep layers and does not take a token budget: "
             "its rows repeat across budgets.",
             "Values are means over examples with 95% bootstrap intervals; memory is the "
             "measured KV bytes held relative to the full cache at the same step (mean "
             "over steps, and peak). `fp8` is stock vLLM's `kv_cache_dtype=\"fp8\"` "
             "(the full cache stored in e4m3): emulated in the research path, served for "
             "real in engine tasks; its memory is relative to the 16-bit cache vLLM "
             "serves.", ""]
    if any(t.get("shared_prefill") for t in results["tasks"]):
        lines += [
            "**Protocol of the shared-prefill tasks** (`shared_prefill=True`): each "
            "window's prompt runs once with the full cache in a single forward pass; "
            "every row continues from that state, is compressed once after the prompt "
            "(and again only if it outgrows its budget by the slack), and is scored on "
            "the teacher-forced continuation. vLLM's formats (`fp8`, "
            "`int8_per_token_head`, `int4_per_token_head`, `turboquant_*`: emulations "
            "replicated from vLLM 0.32's source and checked against its kernels, "
            "`vllm_kvshrink/storage/vllm_formats.py`) hold the whole cache from the "
            "end of the prompt on, every later token as it is stored; TurboQuant keeps "
            "the first and last two layers in bf16, as vLLM does. `uniform:<form>` "
            "holds every token but the sinks and the recent window in one of our "
            "forms, nothing evicted (`uniform:int4` is KIVI's scheme). "
            "`<scorer>/<forms>` is the tier policy with that scorer over those forms "
            "at a budget in bytes. Memory is the measured bytes held (codes, scales, "
            "zero points) over the bf16 full cache, mean over steps. MiniCache runs "
            "with its default retention (`minicache_retain_cos=0`: tokens whose two "
            "layers' directions point apart stay unmerged), the setting of the "
            "earlier reports, so that its row stays comparable; it takes no budget.",
            ""]
    for task in results["tasks"]:
        name, kind = task["name"], task["kind"]
        metric, hib = PRIMARY[kind]
        spec = ", ".join(f"{k}={v}" for k, v in task.items()
                         if k not in ("name", "kind", "methods"))
        lines += [f"## {name} ({kind}: {spec})", ""]
        ch = results["chance"].get(name)
        if ch:
            ctl = "n/a" if ch["control"] is None else f"{ch['control']:.3f}"
            verdict = {True: "well above chance: informative",
                       False: "NOT well above chance: not informative at this length",
                       None: "chance level unknown"}[ch["above_chance"]]
            lines += [f"Full-cache copy accuracy {ch['full_cache']:.3f} vs control "
                      f"(passage not shown) {ctl} — {verdict} (margin "
                      f"{ch['margin']}).", ""]
        cols = [metric] + ([] if kind == "engine_copy" else ["top1_agree", "kl", "attn_cos"])
        cols += ["kv_mean_ratio", "kv_peak_ratio"]
        arrow = {True: "↑", False: "↓"}
        lines.append("| method | budget | " + " | ".join(
            f"{c} {arrow[METRICS[c]]}" for c in cols) + " | n |")
        lines.append("|---" * (len(cols) + 3) + "|")
        for c in cells:
            if c["task"] != name:
                continue
            b = "full" if c["budget"] is None else str(c["budget"])
            s = c["summary"]
            n = len(c["examples"])
            lines.append(f"| {c['method']} | {b} | " + " | ".join(
                _fmt(s.get(k)) for k in cols) + f" | {n} |")
        comps = [r for r in results["comparisons"] if r["task"] == name and
                 r["metric"] == metric]
        if comps:
            lines += ["", f"Paired Wilcoxon signed-rank tests on `{metric}` "
                      f"({'higher' if hib else 'lower'} is better); r = matched-pairs "
                      "rank-biserial correlation of method − baseline; 'better'/'worse' "
                      "needs p < 0.05 and a bootstrap interval of the mean difference "
                      "that excludes 0.", "",
                      "| budget | method | baseline | mean diff [95% CI] | p | r | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for r in comps:
                b = "full" if r["budget"] is None else r["budget"]
                lines.append(f"| {b} | {r['method']} | {r['baseline']} | "
                             f"{r['mean_diff']:+.4f} [{r['diff_ci'][0]:+.4f}, "
                             f"{r['diff_ci'][1]:+.4f}] | {_p(r['p_value'])} | "
                             f"{r['rank_biserial']:+.2f} | {r['verdict']} |")
        lines.append("")
        if task.get("shared_prefill"):
            from vllm_kvshrink.lab.eval.targets import frontier

            lines += [f"Pareto frontier (bytes held, perplexity) of {name}: "
                      + ", ".join(f"`{x}`" for x in frontier(results, name)), ""]
    from vllm_kvshrink.lab.eval.targets import render_targets

    lines += render_targets(results)
    from vllm_kvshrink.lab.eval import contributions

    lines += contributions.render(results, results["meta"].get("targets", []),
                                  results["meta"].get("pareto", []))
    preds = [(c["task"], c["method"], c["budget"], r["predictor"]) for c in cells
             for r in c["examples"][-1:] if "predictor" in r]
    if preds:
        lines += ["## Temporal predictor (last example of each cell)", ""]
        for t, m, b, p in preds:
            lines.append(f"- {t} {m} budget={b}: `{json.dumps(p)[:300]}`")
        lines.append("")
    merged = [(c["task"], c["method"], c["budget"],
               float(np.mean([r.get("merged_tokens", 0) for r in c["examples"]])))
              for c in cells if "semantic" in c["method"]]
    if merged:
        lines += ["## Semantic merger: tokens merged per example (mean)", ""]
        lines += [f"- {t} {m} budget={b}: {v:.1f}" for t, m, b, v in merged]
        lines.append("")
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in results.get("plots", [])), ""]
    return "\n".join(lines)


def make_plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cells = results["cells"]
    for task in results["tasks"]:
        name, kind = task["name"], task["kind"]
        metric, hib = PRIMARY[kind]
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in results["meta"]["methods"]:
            if task.get("shared_prefill") and "/" in m:
                continue  # tiered rows: on the Pareto plot
            cs = sorted((c for c in cells if c["task"] == name and c["method"] == m
                         and c["budget"] is not None), key=lambda c: c["budget"])
            if unbudgeted(m):
                full = [c for c in cells if c["task"] == name and c["method"] == m]
                if full:
                    ax.axhline(full[0]["summary"][metric]["mean"],
                               color="black" if m == "none" else "tab:brown",
                               linestyle="--" if m == "none" else "-.",
                               label="full cache" if m == "none" else f"{m} (full cache)")
                continue
            if not cs:
                continue
            xs = [c["budget"] for c in cs]
            ys = [c["summary"][metric]["mean"] for c in cs]
            lo = [c["summary"][metric]["lo"] for c in cs]
            hi = [c["summary"][metric]["hi"] for c in cs]
            ax.errorbar(xs, ys, yerr=[np.subtract(ys, lo), np.subtract(hi, ys)],
                        marker="o", capsize=3, label=m)
        ch = results["chance"].get(name)
        if ch and ch.get("control") is not None:
            ax.axhline(ch["control"], color="grey", linestyle=":", label="chance (control)")
        ax.set_xlabel("budget")
        ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fname = f"{name}_{metric}.png"
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        files.append(fname)
    from vllm_kvshrink.lab.eval.targets import pareto_plot

    for task in results["tasks"]:
        if task["kind"] == "ppl":
            name = pareto_plot(results, task, out)
            if name:
                files.append(name)
    # Memory: measured KV bytes held relative to the full cache.
    rows = {}
    for c in cells:
        if c["budget"] is None or "kv_mean_ratio" not in c["summary"]:
            continue
        k = (c["method"], c["budget"])
        rows.setdefault(k, []).append((c["summary"]["kv_mean_ratio"]["mean"],
                                       c["summary"]["kv_peak_ratio"]["mean"]))
    if rows:
        keys = sorted(rows, key=lambda k: (k[1], results["meta"]["methods"].index(k[0])))
        mean = [np.mean([a for a, _ in rows[k]]) for k in keys]
        peak = [np.mean([b for _, b in rows[k]]) for k in keys]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(keys)), 4))
        x = np.arange(len(keys))
        ax.bar(x - 0.2, mean, 0.4, label="mean over steps")
        ax.bar(x + 0.2, peak, 0.4, label="peak")
        ax.set_xticks(x, [f"{m}\n{b}" for m, b in keys], fontsize=7, rotation=45)
        ax.set_ylabel("KV bytes held / full cache")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=7)
        ax.set_title("Measured KV memory (all tasks)")
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=90)
        plt.close(fig)
        files.append("memory.png")
    return files


def write_outputs(ev, results: dict) -> None:
    out = ev.out
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = make_plots(results, out) if ev.plots else []
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    (out / "report.md").write_text(render_markdown(results))
