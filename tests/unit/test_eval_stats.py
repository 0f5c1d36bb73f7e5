"""Statistics of the evaluation harness against hand-computed and scipy values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from vllm_kvshrink.lab.eval import stats


def test_bootstrap_ci_matches_hand_resampling_and_is_seeded():
    vals = [0.1, 0.4, 0.35, 0.8, 0.5, 0.2]
    got = stats.bootstrap_ci(vals, n_boot=1000, seed=7)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 6, size=(1000, 6))
    means = np.asarray(vals)[idx].mean(axis=1)
    assert got["mean"] == pytest.approx(np.mean(vals))
    assert got["lo"] == pytest.approx(np.quantile(means, 0.025))
    assert got["hi"] == pytest.approx(np.quantile(means, 0.975))
    assert got["lo"] <= got["mean"] <= got["hi"]
    assert stats.bootstrap_ci(vals, n_boot=1000, seed=7) == got
    assert stats.bootstrap_ci([3.0]) == {"mean": 3.0, "lo": 3.0, "hi": 3.0, "n": 1}


def test_paired_bootstrap_is_bootstrap_of_differences():
    x, y = [1.0, 2.0, 3.5, 4.0], [0.5, 2.5, 3.0, 3.0]
    assert stats.paired_bootstrap_ci(x, y, seed=3) == stats.bootstrap_ci(
        np.subtract(x, y), seed=3)


def test_wilcoxon_hand_computed_exact_case():
    # Differences 2, 3, 5, 7, 11, 13, -1: |d| ranks 1..7, the only negative
    # difference has rank 1, so W+ = 27, W- = 1.  Exact two-sided p:
    # 2 * P(W <= 1) = 2 * #{subsets of 1..7 summing to <= 1} / 2^7 = 2 * 2 / 128.
    y = [10.0] * 7
    x = [12.0, 13.0, 15.0, 17.0, 21.0, 23.0, 9.0]
    res = stats.wilcoxon_paired(x, y)
    assert res["statistic"] == 1.0
    assert res["p_value"] == pytest.approx(4 / 128)
    assert res["rank_biserial"] == pytest.approx((27 - 1) / 28)
    assert res["n"] == 7 and res["n_nonzero"] == 7
    assert res["mean_diff"] == pytest.approx(np.mean(np.subtract(x, y)))


def test_wilcoxon_matches_scipy_on_random_pairs():
    rng = np.random.default_rng(0)
    for n in (5, 12, 40):
        x = rng.normal(size=n)
        y = x + rng.normal(0.3, 1.0, size=n)
        res = stats.wilcoxon_paired(x, y)
        ref = wilcoxon(x, y)
        assert res["statistic"] == pytest.approx(float(ref.statistic))
        assert res["p_value"] == pytest.approx(float(ref.pvalue))


def test_rank_biserial_with_ties_and_zeros():
    # d = 1, -1, 2, 0: the zero is dropped; |d| ranks 1.5, 1.5, 3.
    # W+ = 1.5 + 3 = 4.5, W- = 1.5 -> r = 3 / 6 = 0.5
    assert stats.rank_biserial([1, 0, 5, 2], [0, 1, 3, 2]) == pytest.approx(0.5)
    assert stats.rank_biserial([1, 2], [1, 2]) == 0.0
    assert stats.rank_biserial([3, 4, 5], [1, 1, 1]) == 1.0
    assert stats.rank_biserial([1, 1, 1], [3, 4, 5]) == -1.0


def test_identical_samples_give_p_one_and_no_claim():
    res = stats.compare([0.5, 0.7, 0.9], [0.5, 0.7, 0.9], higher_is_better=True)
    assert res["p_value"] == 1.0 and res["rank_biserial"] == 0.0
    assert res["verdict"] == "no significant difference"


def test_compare_verdict_respects_direction():
    base = list(np.linspace(1.0, 2.0, 12))
    worse_nll = [b + 0.5 + 0.01 * i for i, b in enumerate(base)]
    res = stats.compare(worse_nll, base, higher_is_better=False)
    assert res["p_value"] < 0.05 and res["diff_ci"][0] > 0
    assert res["verdict"] == "worse"
    assert stats.compare(worse_nll, base, higher_is_better=True)["verdict"] == "better"


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="differ in length: x has 2, y has 3"):
        stats.wilcoxon_paired([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        stats.bootstrap_ci([1.0, math.nan])
    with pytest.raises(ValueError, match="at least one value"):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError, match="alpha=1.5 is out of range"):
        stats.bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot=0 is out of range"):
        stats.bootstrap_ci([1.0, 2.0], n_boot=0)
