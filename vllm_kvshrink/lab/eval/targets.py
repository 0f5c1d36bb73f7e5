"""Quality against memory: the Pareto plot of each task and the tiered-storage
targets, met or not.

Rows are classed by what they are (:func:`row_class`): the full cache,
vLLM's uniform formats, our uniform forms, eviction, and tiered storage
(``<scorer>/<forms>``).  Memory is the measured bytes held over the bf16
full cache (``kv_mean_ratio``), never a token count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vllm_kvshrink.lab.eval import stats
from vllm_kvshrink.lab.eval.presets import STORAGE_BASELINES, UNIFORM_PREFIX

#: the targets of the tiered-storage issue: budget -> (max perplexity
#: increase over the full cache in %, least top-1 agreement)
TARGETS = {0.25: (0.5, 0.96), 0.125: (1.0, 0.94)}
HEADLINE_EVICTION_BUDGET = 0.25


def row_class(method: str) -> str:
    if method == "none":
        return "full"
    if method in STORAGE_BASELINES:
        return "vllm"
    if method.startswith(UNIFORM_PREFIX):
        return "uniform"
    if "/" in method:
        return "tiered"
    if method == "minicache":
        return "merge"
    return "eviction"


def _mean(cell, metric):
    return float(np.mean([r[metric] for r in cell["examples"]]))


def _ppl_pct(cell, full) -> float:
    """Perplexity change over the full cache, % (ppl = exp(mean nll))."""
    return 100 * (math.exp(_mean(cell, "nll") - _mean(full, "nll")) - 1)


def _cmp(a, b, n_boot, seed) -> dict:
    x = [r["nll"] for r in a["examples"]]
    y = [r["nll"] for r in b["examples"]]
    if len(x) != len(y):
        return {"verdict": "unpaired", "p_value": float("nan")}
    return stats.compare(x, y, False, n_boot=n_boot, seed=seed)


def target_rows(results: dict, task: str) -> list[dict]:
    """For every tiered row of ``task`` at a target budget: its perplexity
    change and top-1 agreement, its paired test against the best eviction
    method at 25 % and against vLLM's ``int4_per_token_head``, and (at
    12.5 %) against every eviction method at 25 %."""
    meta = results["meta"]
    n_boot, seed = meta["settings"]["n_boot"], meta["seed"]
    cells = [c for c in results["cells"] if c["task"] == task and "nll" in c["examples"][0]]
    full = next((c for c in cells if c["method"] == "none"), None)
    if full is None:
        return []
    evict25 = [c for c in cells if row_class(c["method"]) == "eviction"
               and c["budget"] == HEADLINE_EVICTION_BUDGET]
    best_ev = min(evict25, key=lambda c: _mean(c, "nll")) if evict25 else None
    int4 = next((c for c in cells if c["method"] == "int4_per_token_head"), None)
    out = []
    for c in cells:
        if row_class(c["method"]) != "tiered" or c["budget"] not in TARGETS:
            continue
        max_pct, min_top1 = TARGETS[c["budget"]]
        row = {"method": c["method"], "budget": c["budget"], "n": len(c["examples"]),
               "kv_mean_ratio": _mean(c, "kv_mean_ratio"),
               "ppl_pct": _ppl_pct(c, full), "top1": _mean(c, "top1_agree")}
        checks = {"ppl": row["ppl_pct"] <= max_pct, "top1": row["top1"] >= min_top1}
        if best_ev is not None:
            r = _cmp(c, best_ev, n_boot, seed)
            row["vs_best_eviction"] = {"baseline": best_ev["method"], **r}
            if c["budget"] == 0.25:
                checks["beats best eviction"] = r["verdict"] == "better"
        if int4 is not None and c["budget"] == 0.25:
            r = _cmp(c, int4, n_boot, seed)
            row["vs_int4_per_token_head"] = r
            checks["not worse than int4_per_token_head"] = r["verdict"] != "worse"
        if c["budget"] == 0.125 and evict25:
            verdicts = {e["method"]: _cmp(c, e, n_boot, seed)["verdict"] for e in evict25}
            row["vs_every_eviction_25"] = verdicts
            checks["beats every eviction at 0.25"] = all(v == "better"
                                                         for v in verdicts.values())
        row["checks"] = checks
        row["met"] = all(checks.values())
        out.append(row)
    return out


def render_targets(results: dict) -> list[str]:
    lines = []
    for task in results["tasks"]:
        rows = target_rows(results, task["name"])
        if not rows:
            continue
        lines += [f"### Tiered-storage targets: {task['name']}", "",
                  "Targets: at <= 25 % of the bf16 bytes, perplexity within +0.5 % of the "
                  "full cache, top-1 >= 0.96, significantly better than the best eviction "
                  "method at 25 % and no worse than vLLM's `int4_per_token_head`; at "
                  "<= 12.5 %, within +1 %, top-1 >= 0.94 and better than every eviction "
                  "method at 25 %. Paired Wilcoxon on per-example nll.", "",
                  "| row | budget | bytes held | ppl vs full | top-1 | vs best eviction @0.25 "
                  "| vs int4_per_token_head | targets |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ev = r.get("vs_best_eviction")
            evs = (f"{ev['baseline']}: {ev['verdict']} (p={_p(ev['p_value'])})" if ev else "-")
            i4 = r.get("vs_int4_per_token_head")
            i4s = f"{i4['verdict']} (p={_p(i4['p_value'])})" if i4 else "-"
            failed = [k for k, ok in r["checks"].items() if not ok]
            verdict = "**met**" if r["met"] else "not met: " + ", ".join(failed)
            if "vs_every_eviction_25" in r:
                worse = [m for m, v in r["vs_every_eviction_25"].items() if v != "better"]
                evs += "; every eviction @0.25: " + ("better than all" if not worse else
                                                     "not better than " + ", ".join(worse))
            lines.append(f"| {r['method']} | {r['budget']} | {r['kv_mean_ratio']:.3f} | "
                         f"{r['ppl_pct']:+.2f} % | {r['top1']:.3f} | {evs} | {i4s} | "
                         f"{verdict} |")
        lines.append("")
    return lines


def _p(p: float) -> str:
    return "-" if p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


COLORS = {"full": "black", "vllm": "tab:red", "uniform": "tab:orange",
          "eviction": "tab:blue", "tiered": "tab:green", "merge": "tab:grey"}


def pareto_plot(results: dict, task: dict, out: Path) -> str | None:
    """Perplexity change against measured bytes held, every row of ``task``;
    the lower-left frontier drawn through the rows no other row beats on
    both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"] if c["task"] == task["name"]
             and c["examples"] and "nll" in c["examples"][0]]
    full = next((c for c in cells if c["method"] == "none"), None)
    if full is None or len(cells) < 2:
        return None
    pts = [(_mean(c, "kv_mean_ratio"), _ppl_pct(c, full), c) for c in cells]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for x, y, c in pts:
        cls = row_class(c["method"])
        ax.scatter(x, y, color=COLORS[cls], s=22, zorder=3)
        label = c["method"] + ("" if c["budget"] is None else f" @{c['budget']}")
        ax.annotate(label, (x, y), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
    front, best = [], float("inf")
    for x, y, _ in sorted(pts, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y))
            best = y
    ax.plot(*zip(*front), color="black", linewidth=0.8, linestyle="--", zorder=2,
            label="Pareto frontier")
    for cls, col in COLORS.items():
        ax.scatter([], [], color=col, label=cls)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("KV bytes held / bf16 full cache (measured, mean over steps)")
    ax.set_ylabel("perplexity vs full cache (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(f"{task['name']}: quality against memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"{task['name']}_pareto.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def frontier(results: dict, task: str) -> list[str]:
    """Rows on the lower-left frontier (bytes, perplexity) of ``task``."""
    cells = [c for c in results["cells"] if c["task"] == task and c["examples"]
             and "nll" in c["examples"][0]]
    full = next((c for c in cells if c["method"] == "none"), None)
    if full is None:
        return []
    pts = sorted(((_mean(c, "kv_mean_ratio"), _ppl_pct(c, full), c) for c in cells),
                 key=lambda p: (p[0], p[1]))
    out, best = [], float("inf")
    for x, y, c in pts:
        if y < best:
            out.append(c["method"] + ("" if c["budget"] is None else f" @{c['budget']}"))
            best = y
    return out
