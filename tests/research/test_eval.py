"""The evaluation harness on the real model and real text (small sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from vllm_kvshrink.lab.eval import EvalError, ResearchEvaluator


def _cli(out, *extra):
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vllm_kvshrink.lab.eval", "--preset", "smoke",
                           "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=600)
    return proc, time.perf_counter() - t


def test_smoke_cli_writes_results_and_resumes(tmp_path, model_path):
    out = tmp_path / "smoke"
    # The smoke preset with one compressed method, to keep the test short.
    proc, first = _cli(out, "--methods", "snapkv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[eval 1/4]" in proc.stderr  # progress lines
    for name in ("results.json", "report.md", "memory.png", "austen_96_nll.png",
                 "copy_64_copy_acc.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert [c["method"] for c in res["cells"]] == ["none", "snapkv"] * 2
    for cell in res["cells"]:
        assert len(cell["examples"]) == 2
        for row in cell["examples"]:
            if cell["method"] == "none":
                # The full cache against itself: exact.
                assert row["top1_agree"] == 1.0 and row["kl"] == 0.0
                assert row["kv_mean_ratio"] == 1.0 and row["kv_peak_ratio"] == 1.0
            else:
                assert 0.0 <= row["top1_agree"] <= 1.0 and row["kl"] >= 0.0
                assert row["kv_peak_ratio"] < 1.0  # memory was measurably saved
    assert res["chance"]["copy_64"]["control"] is not None
    assert {(c["method"], c["baseline"], c["metric"]) for c in res["comparisons"]} == {
        ("snapkv", "none", "nll"), ("snapkv", "none", "copy_acc")}
    report = (out / "report.md").read_text()
    assert "Full-cache copy accuracy" in report and "Wilcoxon" in report
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in cells}

    proc, second = _cli(out, "--methods", "snapkv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 cells computed, 4 reused" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    assert second < first
    again = json.loads((out / "results.json").read_text())
    assert [c["examples"] for c in again["cells"]] == [c["examples"] for c in res["cells"]]


def test_no_eviction_is_exactly_the_full_cache(tmp_path, model_path):
    ev = ResearchEvaluator(tmp_path, preset="smoke", methods=["streaming"], budgets=[1.0],
                           tasks=[{"name": "austen_64", "kind": "ppl", "context": 64,
                                   "continuation": 16, "examples": 1}],
                           progress=False, plots=False)
    res = ev.run()
    full, kept_all = res["cells"]
    assert kept_all["method"] == "streaming"
    row = kept_all["examples"][0]
    assert row["top1_agree"] == 1.0 and row["kl"] == 0.0
    assert row["nll"] == full["examples"][0]["nll"]
    assert row["attn_cos"] == pytest.approx(1.0, abs=1e-5)
    assert ev.last_run["computed"] == 2
    ev2 = ResearchEvaluator(tmp_path, preset="smoke", methods=["streaming"], budgets=[1.0],
                            tasks=ev.tasks, progress=False, plots=False)
    ev2.run()
    assert ev2.last_run == {**ev2.last_run, "computed": 0, "reused": 2}
    assert ev2._model is None  # nothing to compute: the model was never loaded


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": "fast"}, r"preset='fast' is not known; allowed: smoke, quick, tiers, ours, full"),
    ({"methods": ["h2oo"]}, r"methods: 'h2oo' is not a known method; allowed: none"),
    ({"budgets": [1.5]}, r"budgets=1.5 is out of range"),
    ({"budgets": []}, r"budgets: none given"),
    ({"dtype": "float8"}, r"dtype='float8' is not supported; allowed: float32, bfloat16"),
    ({"tasks": [{"name": "t", "kind": "needle"}]}, r"kind='needle' is not known"),
    ({"tasks": [{"name": "t", "kind": "ppl", "context": 0, "continuation": 8,
                 "examples": 1}]}, r"context=0 is out of range"),
])
def test_bad_settings_are_named(tmp_path, kwargs, match):
    with pytest.raises(EvalError, match=match):
        ResearchEvaluator(tmp_path, **{"preset": "smoke", **kwargs})


def test_cli_bad_method_exits_with_message(tmp_path):
    proc, _ = _cli(tmp_path, "--methods", "snapkvv")
    assert proc.returncode == 2
    assert "'snapkvv' is not a known method; allowed:" in proc.stderr


def test_lcs_recall_hand_values():
    from vllm_kvshrink.lab.eval.engine import lcs_recall

    assert lcs_recall([9, 1, 2, 3], [1, 2, 3]) == 1.0  # a leading extra token is no miss
    assert lcs_recall([1, 3], [1, 2, 3, 4]) == 0.5
    assert lcs_recall([], [1, 2]) == 0.0
    with pytest.raises(ValueError, match="non-empty reference"):
        lcs_recall([1], [])


def test_engine_copy_served_by_vllm_with_per_request_methods(tmp_path, model_path):
    task = {"name": "engine_copy_96", "kind": "engine_copy", "passage": 16, "filler": 96,
            "examples": 2}
    kw = dict(preset="smoke", methods=["snapkv", "minicache"], budgets=[0.5],
              tasks=[task], progress=False, plots=False)
    ev = ResearchEvaluator(tmp_path, **kw)
    res = ev.run()
    # MiniCache runs in the research path only: not served.
    assert [(c["method"], c["budget"]) for c in res["cells"]] == [("none", None),
                                                                  ("snapkv", 0.5)]
    assert all(c["engine"] and len(c["examples"]) == 2 for c in res["cells"])
    chance = res["chance"]["engine_copy_96"]
    assert chance["control"] is not None and chance["full_cache"] > chance["control"]
    assert ev.last_run["computed"] == 2
    ev2 = ResearchEvaluator(tmp_path, **kw)
    ev2.run()
    assert (ev2.last_run["computed"], ev2.last_run["reused"]) == (0, 2)


def test_fp8_storage_baseline(tmp_path, model_path):
    """Stock vLLM's kv_cache_dtype=fp8, emulated in the research path: half
    the bytes of a 16-bit cache, close to but not exactly the full cache."""
    task = {"name": "austen_64", "kind": "ppl", "context": 64, "continuation": 16,
            "examples": 2}
    ev = ResearchEvaluator(tmp_path, preset="smoke", methods=["fp8"], tasks=[task],
                           progress=False, plots=False)
    res = ev.run()
    assert [(c["method"], c["budget"]) for c in res["cells"]] == [("none", None),
                                                                  ("fp8", None)]
    for row in res["cells"][1]["examples"]:
        assert row["kv_peak_ratio"] == 0.5
        assert 0.0 < row["kl"] < 0.1
    assert {(c["method"], c["baseline"]) for c in res["comparisons"]} == {("fp8", "none")}
