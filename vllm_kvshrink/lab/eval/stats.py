"""Paired statistics for the evaluation harness.

Every method is scored on the same examples as every baseline, so the
comparisons are paired: a percentile bootstrap confidence interval of a mean
(or of the mean paired difference), the Wilcoxon signed-rank test of the
paired differences (``scipy.stats.wilcoxon``) and the matched-pairs
rank-biserial correlation as its effect size.  All resampling is seeded.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds a non-finite value ({arr.tolist()}); allowed: "
                         f"finite numbers only")
    return arr


def _check_pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_array(x, "x"), _as_array(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: x has {a.size}, y has "
                         f"{b.size}; allowed: one value per example in both")
    return a, b


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> dict:
    """Mean and percentile-bootstrap ``(1 - alpha)`` interval of ``values``.

    One value gives a zero-width interval; none raises ``ValueError``.
    """
    arr = _as_array(values, "values")
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value; got none")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"n_boot={n_boot!r} is out of range; allowed: a whole number >= 1")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha={alpha!r} is out of range; allowed: 0 < alpha < 1")
    mean = float(arr.mean())
    if arr.size == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    means = arr[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": int(arr.size)}


def paired_bootstrap_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000,
                        alpha: float = 0.05, seed: int = 0) -> dict:
    """Bootstrap interval of the mean paired difference ``x - y``."""
    a, b = _check_pair(x, y)
    return bootstrap_ci(a - b, n_boot=n_boot, alpha=alpha, seed=seed)


def _signed_rank_sums(d: np.ndarray) -> tuple[float, float, int]:
    """``(W+, W-, n)`` over the non-zero differences, ties given mean ranks."""
    from scipy.stats import rankdata

    nz = d[d != 0]
    if nz.size == 0:
        return 0.0, 0.0, 0
    ranks = rankdata(np.abs(nz))
    return float(ranks[nz > 0].sum()), float(ranks[nz < 0].sum()), int(nz.size)


def rank_biserial(x: Sequence[float], y: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation of ``x - y``:
    ``(W+ - W-) / (W+ + W-)`` in [-1, 1]; positive when ``x`` tends to be
    larger.  Zero differences are dropped (Wilcoxon's convention); all-zero
    differences give 0."""
    a, b = _check_pair(x, y)
    wp, wm, n = _signed_rank_sums(a - b)
    return 0.0 if n == 0 else (wp - wm) / (wp + wm)


def wilcoxon_paired(x: Sequence[float], y: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``x`` against ``y`` (paired).

    Returns ``n`` (pairs), ``n_nonzero``, ``statistic`` (scipy's: the smaller
    rank sum), ``p_value`` (``1.0`` when every difference is zero, ``nan``
    with no pairs), ``rank_biserial`` and the mean / median difference.
    """
    from scipy.stats import wilcoxon

    a, b = _check_pair(x, y)
    d = a - b
    wp, wm, n_nz = _signed_rank_sums(d)
    out = {"n": int(d.size), "n_nonzero": n_nz,
           "mean_diff": float(d.mean()) if d.size else math.nan,
           "median_diff": float(np.median(d)) if d.size else math.nan,
           "rank_biserial": 0.0 if n_nz == 0 else (wp - wm) / (wp + wm)}
    if d.size == 0:
        out.update(statistic=math.nan, p_value=math.nan)
    elif n_nz == 0:
        out.update(statistic=0.0, p_value=1.0)
    else:
        res = wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
        out.update(statistic=float(res.statistic), p_value=float(res.pvalue))
    return out


def compare(method: Sequence[float], baseline: Sequence[float], higher_is_better: bool,
            n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of a method against a baseline on one metric.

    ``verdict`` is ``"better"`` / ``"worse"`` only when the Wilcoxon p-value
    is below 0.05 *and* the bootstrap interval of the mean difference excludes
    zero; otherwise ``"no significant difference"``.
    """
    test = wilcoxon_paired(method, baseline)
    diff = paired_bootstrap_ci(method, baseline, n_boot=n_boot, seed=seed)
    verdict = "no significant difference"
    p = test["p_value"]
    if not math.isnan(p) and p < 0.05 and (diff["lo"] > 0 or diff["hi"] < 0):
        up = diff["mean"] > 0
        verdict = "better" if up == higher_is_better else "worse"
    return {**test, "diff_ci": [diff["lo"], diff["hi"]], "verdict": verdict}
