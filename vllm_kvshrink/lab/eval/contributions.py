"""Our own contributions against their simple twins: each target of a preset
(``targets``), met or not, and each named row's place on the Pareto plot
(``pareto``): on the frontier, or dominated by a row named.

A target pairs a ``row`` with ``baselines`` on the same examples of a task
and budget; ``want`` is ``better`` (per-example nll significantly lower:
paired Wilcoxon p < 0.05 and a bootstrap interval of the mean difference
below 0) or ``not_worse`` (not significantly higher).  A target is met when
every (task, budget, baseline) it covers passes.
"""

from __future__ import annotations

import math

import numpy as np

from vllm_kvshrink.lab.eval import stats

WANTS = ("better", "not_worse")


def _mean(cell: dict, key: str) -> float | None:
    vals = [r[key] for r in cell["examples"] if key in r]
    return float(np.mean(vals)) if vals else None


def target_rows(results: dict, targets: list[dict]) -> list[dict]:
    """One row per (target, task, budget, baseline) present in ``results``."""
    meta = results["meta"]
    n_boot, seed = meta["settings"]["n_boot"], meta["seed"]
    by = {(c["task"], c["method"], c["budget"]): c for c in results["cells"]}
    out = []
    for t in targets:
        if t["want"] not in WANTS:
            raise ValueError(f"target {t['name']!r}: want={t['want']!r}; allowed: "
                             f"{', '.join(WANTS)}")
        for task in results["tasks"]:
            if "task" in t and task["name"] != t["task"]:
                continue
            for budget in t.get("budgets", task.get("budgets", meta["budgets"])):
                row = by.get((task["name"], t["row"], budget))
                if row is None or "nll" not in row["examples"][0]:
                    continue
                for base in t["baselines"]:
                    bc = by.get((task["name"], base, budget))
                    if bc is None:
                        continue
                    x = [r["nll"] for r in row["examples"]]
                    y = [r["nll"] for r in bc["examples"]]
                    if len(x) != len(y):
                        continue
                    cmp = stats.compare(x, y, False, n_boot=n_boot, seed=seed)
                    ok = (cmp["verdict"] == "better" if t["want"] == "better"
                          else cmp["verdict"] != "worse")
                    out.append({"target": t["name"], "task": task["name"],
                                "budget": budget, "row": t["row"], "baseline": base,
                                "want": t["want"], "ok": ok, "n": len(x),
                                "offload_mean_ratio": _mean(row, "offload_mean_ratio"),
                                "promoted_per_token": _mean(row, "promoted_per_token"),
                                "scan_per_token": _mean(row, "scan_per_token"),
                                "kv_mean_ratio": _mean(row, "kv_mean_ratio"),
                                **{k: cmp[k] for k in ("mean_diff", "diff_ci", "p_value",
                                                       "verdict")}})
    return out


def verdicts(rows: list[dict]) -> dict[tuple[str, str], bool]:
    """``(target, row) -> met`` over everything the rows cover."""
    met: dict[tuple[str, str], bool] = {}
    for r in rows:
        key = (r["target"], r["row"])
        met[key] = met.get(key, True) and r["ok"]
    return met


def _ppl_pct(cell: dict, full: dict) -> float:
    return 100 * (math.exp(_mean(cell, "nll") - _mean(full, "nll")) - 1)


def pareto_places(results: dict, names: list[str]) -> list[dict]:
    """Per task and budget of each named row: its bytes and perplexity
    change, and the rows that dominate it (no more bytes held and lower
    perplexity), best first; none = on the frontier."""
    out = []
    for task in results["tasks"]:
        cells = [c for c in results["cells"] if c["task"] == task["name"]
                 and c["examples"] and "nll" in c["examples"][0]]
        full = next((c for c in cells if c["method"] == "none"), None)
        if full is None:
            continue
        pts = [(_mean(c, "kv_mean_ratio"), _ppl_pct(c, full), c) for c in cells]
        for x, y, c in pts:
            if c["method"] not in names:
                continue
            over = sorted((p for p in pts if p[0] <= x and p[1] < y and p[2] is not c),
                          key=lambda p: p[1])
            out.append({"task": task["name"], "row": c["method"], "budget": c["budget"],
                        "kv_mean_ratio": x, "ppl_pct": y,
                        "dominated_by": [p[2]["method"] + ("" if p[2]["budget"] is None
                                                           else f" @{p[2]['budget']}")
                                         for p in over[:3]]})
    return out


def render(results: dict, targets: list[dict], pareto: list[str]) -> list[str]:
    if not targets and not pareto:
        return []
    lines = ["## Our contributions: targets", ""]
    rows = target_rows(results, targets)
    met = verdicts(rows)
    if rows:
        lines += ["Each row against its simple twin on the same examples (paired "
                  "Wilcoxon on per-example nll; 'better' needs p < 0.05 and a bootstrap "
                  "interval of the mean difference below 0). Promotion rows state their "
                  "offload copy apart from the resident bytes: its mean bytes over the "
                  "full cache's, and the bytes read back per scored token (originals of "
                  "promoted tokens; offloaded keys the scorer reads) in units of one "
                  "token's bf16 K+V of the whole model.", "",
                  "| target | task | budget | row | baseline | resident bytes | offload "
                  "| read back / token | scorer reads / token | mean diff [95% CI] | p "
                  "| verdict | wanted | ok |", "|---" * 14 + "|"]
        for r in rows:
            def f(v, d=3):
                return "-" if v is None else f"{v:.{d}f}"
            lines.append(
                f"| {r['target']} | {r['task']} | {r['budget']} | `{r['row']}` | "
                f"`{r['baseline']}` | {f(r['kv_mean_ratio'])} | "
                f"{f(r['offload_mean_ratio'])} | {f(r['promoted_per_token'], 2)} | "
                f"{f(r['scan_per_token'], 2)} | {r['mean_diff']:+.4f} "
                f"[{r['diff_ci'][0]:+.4f}, {r['diff_ci'][1]:+.4f}] | "
                f"{_p(r['p_value'])} | {r['verdict']} | {r['want'].replace('_', ' ')} | "
                f"{'yes' if r['ok'] else '**no**'} |")
        lines += ["", "| target | row | met |", "|---|---|---|"]
        lines += [f"| {t} | `{row}` | {'**met**' if ok else 'not met'} |"
                  for (t, row), ok in met.items()]
        lines.append("")
    places = pareto_places(results, pareto)
    if places:
        lines += ["### On the Pareto plot (bytes held, perplexity)", "",
                  "| task | row | budget | bytes held | ppl vs full | place |",
                  "|---|---|---|---|---|---|"]
        for p in places:
            where = ("**on the frontier**" if not p["dominated_by"] else
                     "dominated by " + ", ".join(f"`{d}`" for d in p["dominated_by"]))
            b = "full" if p["budget"] is None else p["budget"]
            lines.append(f"| {p['task']} | `{p['row']}` | {b} | {p['kv_mean_ratio']:.3f} | "
                         f"{p['ppl_pct']:+.2f} % | {where} |")
        lines.append("")
    return lines


def _p(p: float) -> str:
    return "-" if p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")
