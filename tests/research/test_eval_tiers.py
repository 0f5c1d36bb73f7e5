"""The tiered-storage evaluation: rows of every class continue from one shared
prefill per example, bytes held are measured per form, an interrupted run
resumes per example, and the report carries the Pareto plot and the targets."""

from __future__ import annotations

import pytest

from vllm_kvshrink.lab.eval.evaluator import ResearchEvaluator
from vllm_kvshrink.lab.eval.presets import EvalError, parse_row, unbudgeted
from vllm_kvshrink.lab.eval.targets import row_class, target_rows

ROWS = ["int4_per_token_head", "uniform:int4_tok_rot", "snapkv", "snapkv/int4_tok_rot"]


def test_parse_row():
    assert parse_row("snapkv") == ("snapkv", None, None)
    assert parse_row("tova/bf16,int4") == ("tova", "bf16,int4", None)
    assert parse_row("uniform:int2") == ("streaming", "int2", None)
    assert parse_row("fp8") == ("none", None, "fp8")
    assert unbudgeted("uniform:int4") and unbudgeted("turboquant_4bit_nc")
    assert not unbudgeted("snapkv/int4")
    assert [row_class(r) for r in ROWS] == ["vllm", "uniform", "eviction", "tiered"]


def test_bad_rows_are_refused(tmp_path):
    with pytest.raises(EvalError, match="unknown form 'int3'"):
        ResearchEvaluator(tmp_path, preset="smoke", methods=["snapkv/int3"])
    with pytest.raises(EvalError, match="merging"):
        ResearchEvaluator(tmp_path, preset="smoke", methods=["semantic/int4"])


def test_shared_prefill_task_measures_bytes_and_resumes(tmp_path, model_path):
    task = {"name": "essays_256", "kind": "ppl", "context": 256, "continuation": 16,
            "examples": 2, "corpus": "essays", "shared_prefill": True}
    kw = dict(preset="smoke", methods=ROWS, budgets=[0.25], tasks=[task],
              progress=False, plots=True)
    ev = ResearchEvaluator(tmp_path, **kw)
    res = ev.run()
    cells = {(c["method"], c["budget"]): c for c in res["cells"]}
    assert set(cells) == {("none", None), ("int4_per_token_head", None),
                          ("uniform:int4_tok_rot", None), ("snapkv", 0.25),
                          ("snapkv/int4_tok_rot", 0.25)}
    ratio = {k: [r["kv_peak_ratio"] for r in c["examples"]] for k, c in cells.items()}
    assert all(x == 1.0 for x in ratio[("none", None)])
    assert all(x == 72 / 256 for x in ratio[("int4_per_token_head", None)])
    for key in (("snapkv", 0.25), ("snapkv/int4_tok_rot", 0.25)):
        for row in cells[key]["examples"]:
            assert row["events"] >= 1 and row["kv_mean_ratio"] < 0.45
    tiered = cells[("snapkv/int4_tok_rot", 0.25)]["examples"]
    evicted = cells[("snapkv", 0.25)]["examples"]
    assert all(0 < r["kl"] for r in tiered) and len(tiered) == len(evicted) == 2
    rows = target_rows(res, "essays_256")
    assert [r["method"] for r in rows] == ["snapkv/int4_tok_rot"]
    assert {"ppl", "top1", "beats best eviction",
            "not worse than int4_per_token_head"} == set(rows[0]["checks"])
    report = (tmp_path / "report.md").read_text()
    assert "Tiered-storage targets: essays_256" in report and "Pareto frontier" in report
    assert (tmp_path / "essays_256_pareto.png").stat().st_size > 1000
    assert ev.last_run["computed"] == 2
    ev2 = ResearchEvaluator(tmp_path, **kw)
    ev2.run()
    assert (ev2.last_run["computed"], ev2.last_run["reused"]) == (0, 2)
