"""The same rows of an evaluation before and after a change, paired.

    python -m vllm_kvshrink.lab.eval.versus BEFORE AFTER [--metric nll] [--out FILE]

``BEFORE`` and ``AFTER`` are results folders (their ``results.json``).  Every
(task, method, budget) row present in both is compared example by example on
``--metric`` (lower is better for ``nll`` and ``kl``): a paired Wilcoxon test
and a bootstrap interval of the mean difference (after - before), with the
verdict rule of the reports (:func:`~.stats.compare`).  Prints a markdown
table and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_kvshrink.lab.eval.stats import compare

#: metrics where a higher value is better (the others: lower is better)
HIGHER_IS_BETTER = {"top1_agree", "attn_cos"}


def _rows(folder: Path, metric: str) -> dict:
    cells = json.loads((folder / "results.json").read_text())["cells"]
    out = {}
    for c in cells:
        vals = {e["index"]: e[metric] for e in c["examples"] if e.get(metric) is not None}
        out[(c["task"], c["method"], c["budget"])] = vals
    return out


def versus(before: Path, after: Path, metric: str = "nll") -> list[dict]:
    """One comparison per row present in both folders (rows of ``none``
    left out: it is the reference, the same in both)."""
    a, b = _rows(before, metric), _rows(after, metric)
    res = []
    for key in sorted(set(a) & set(b), key=str):
        if key[1] == "none":
            continue
        idx = sorted(set(a[key]) & set(b[key]))
        if len(idx) < 2:
            continue
        x, y = [b[key][i] for i in idx], [a[key][i] for i in idx]
        cmp = compare(x, y, higher_is_better=metric in HIGHER_IS_BETTER)
        res.append({"task": key[0], "method": key[1], "budget": key[2], "n": len(idx),
                    "before": sum(y) / len(y), "after": sum(x) / len(x), **cmp})
    return res


def render(rows: list[dict], metric: str) -> str:
    lines = [f"| task | method | budget | n | {metric} before | {metric} after | "
             "after - before [95% CI] | p | verdict |", "|---" * 9 + "|"]
    for r in rows:
        lo, hi = r["diff_ci"]
        lines.append(f"| {r['task']} | {r['method']} | {r['budget']} | {r['n']} | "
                     f"{r['before']:.4f} | {r['after']:.4f} | {r['after'] - r['before']:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] | {r['p_value']:.2g} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--metric", default="nll")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    for folder in (args.before, args.after):
        if not (folder / "results.json").is_file():
            ap.error(f"{folder}: no results.json (a folder written by "
                     f"python -m vllm_kvshrink.lab.eval)")
    rows = versus(args.before, args.after, args.metric)
    if not rows:
        ap.error("the two folders share no row with examples on both sides")
    text = render(rows, args.metric)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
