"""The evaluation of our own contributions: rows with their own arguments,
tasks with their own settings and rows, rows added to an example's file
without rerunning the others, online rows that start from a fresh copy of
the predictor, and the report's targets and Pareto places."""

from __future__ import annotations

import json

import pytest

from vllm_kvshrink.lab.eval import contributions
from vllm_kvshrink.lab.eval.evaluator import ResearchEvaluator
from vllm_kvshrink.lab.eval.presets import PRESETS, EvalError, check_task, parse_row, row_args

FORMS = "bf16,int4_tok_rot,int2_tok_rot"


def test_row_args():
    assert row_args("snapkv") == ("snapkv", {})
    assert row_args("temporal[online=true,offload=0.5]/bf16,int4") == (
        "temporal/bf16,int4", {"online": True, "offload": 0.5})
    assert row_args("semantic[mass_correction=true]") == ("semantic",
                                                          {"mass_correction": True})
    assert parse_row("snapkv[offload=1.0]/bf16,int4") == ("snapkv", "bf16,int4", None)
    with pytest.raises(EvalError, match="unclosed"):
        row_args("snapkv[offload=1/bf16")
    with pytest.raises(EvalError, match="not key=value"):
        row_args("snapkv[offload]")


def test_bad_row_arguments_are_refused(tmp_path):
    with pytest.raises(EvalError, match="offload.*tiered storage"):
        ResearchEvaluator(tmp_path, preset="smoke", methods=["snapkv[offload=0.5]"])
    with pytest.raises(EvalError, match="unknown key 'nope'"):
        ResearchEvaluator(tmp_path, preset="smoke", methods=["snapkv[nope=1]"])
    with pytest.raises(EvalError, match="forced_chunk=0"):
        check_task({"name": "t", "kind": "ppl", "context": 8, "continuation": 8,
                    "examples": 1, "forced_chunk": 0})


def test_ours_preset_rows_are_valid(tmp_path):
    ev = ResearchEvaluator(tmp_path, preset="ours")
    rows = {m for _, m, _ in ev.cells()}
    for t in PRESETS["ours"]["targets"]:
        assert t["row"] in rows and set(t["baselines"]) <= rows, t
    assert set(PRESETS["ours"]["pareto"]) <= rows


def _task(**kw):
    return {"name": "austen_160", "kind": "ppl", "context": 160, "continuation": 48,
            "examples": 1, "corpus": "austen", "shared_prefill": True,
            "forced_chunk": 16, "slack_tokens": 16, **kw}


def test_rows_are_added_without_rerunning_the_others(tmp_path, model_path):
    kw = dict(preset="smoke", budgets=[0.25], progress=False, plots=False)
    first = ResearchEvaluator(tmp_path, methods=[f"snapkv/{FORMS}"], tasks=[_task()], **kw)
    first.run()
    (path,) = (tmp_path / "cells").glob("austen_160__example0__*.json")
    before = json.loads(path.read_text())["rows"]
    assert [r["method"] for r in before] == ["none", f"snapkv/{FORMS}"]
    promote = f"snapkv[offload=1.0]/{FORMS}"
    second = ResearchEvaluator(tmp_path, methods=[f"snapkv/{FORMS}", promote],
                               tasks=[_task()], **kw)
    res = second.run()
    after = json.loads(path.read_text())["rows"]
    assert after[:2] == before  # reused as written, not recomputed
    assert [r["method"] for r in after] == ["none", f"snapkv/{FORMS}", promote]
    row = after[2]["row"]
    assert row["events"] >= 2 and 0 < row["offload_mean_ratio"] <= 1.0
    assert row["kv_mean_ratio"] < 0.4 and row["scan_per_token"] > 0
    assert second.last_run["computed"] == 1
    # The task's own settings are in force: events every few tokens.
    cells = {c["method"]: c for c in res["cells"]}
    assert cells[f"snapkv/{FORMS}"]["examples"][0]["events"] >= 2


def test_online_rows_start_from_a_fresh_copy(tmp_path, model_path):
    from vllm_kvshrink.methods import temporal

    kw = dict(preset="smoke", budgets=[0.25], progress=False, plots=False,
              methods=["temporal[online=true]"], tasks=[_task()])
    a = ResearchEvaluator(tmp_path / "a", **kw).run()
    trained = temporal.shared_predictor().stats["updates"]
    assert trained > 0  # the row did train
    b = ResearchEvaluator(tmp_path / "b", **kw).run()
    nll = [next(c for c in r["cells"] if c["method"] != "none")["examples"][0]["nll"]
           for r in (a, b)]
    assert nll[0] == nll[1]


def _cell(task, method, budget, nll, kv):
    return {"task": task, "method": method, "budget": budget,
            "examples": [{"nll": x, "kv_mean_ratio": kv} for x in nll]}


def test_targets_and_pareto_places():
    base = [3.0 + 0.01 * i for i in range(12)]
    results = {
        "meta": {"settings": {"n_boot": 500}, "seed": 0, "budgets": [0.25]},
        "tasks": [{"name": "t"}],
        "cells": [_cell("t", "none", None, [x - 0.2 for x in base], 1.0),
                  _cell("t", "a", 0.25, base, 0.25),
                  _cell("t", "a[x]", 0.25, [x - 0.05 for x in base], 0.25),
                  _cell("t", "b", 0.25, [x + 0.05 for x in base], 0.30)]}
    targets = [{"name": "x", "row": "a[x]", "baselines": ["a"], "want": "better"},
               {"name": "y", "row": "b", "baselines": ["a"], "want": "not_worse"}]
    rows = contributions.target_rows(results, targets)
    assert [(r["row"], r["verdict"], r["ok"]) for r in rows] == [
        ("a[x]", "better", True), ("b", "worse", False)]
    assert contributions.verdicts(rows) == {("x", "a[x]"): True, ("y", "b"): False}
    places = {p["row"]: p for p in contributions.pareto_places(results, ["a[x]", "b"])}
    assert places["a[x]"]["dominated_by"] == []
    assert places["b"]["dominated_by"][0] == "a[x] @0.25"
    md = "\n".join(contributions.render(results, targets, ["b"]))
    assert "**met**" in md and "not met" in md and "dominated by `a[x] @0.25`" in md
    with pytest.raises(ValueError, match="want='more'"):
        contributions.target_rows(results, [dict(targets[0], want="more")])
