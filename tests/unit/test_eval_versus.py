"""Paired before/after comparison of evaluation rows (pure bookkeeping)."""

import json

from vllm_kvshrink.lab.eval.versus import main, versus


def _folder(tmp_path, name, shift):
    ex = lambda base: [{"index": i, "nll": base + 0.01 * i + (shift if i % 2 else 0.0)}  # noqa: E731
                       for i in range(12)]
    cells = [{"task": "t", "method": "none", "budget": None, "examples": ex(3.0)},
             {"task": "t", "method": "snapkv/bf16,int4_tok", "budget": 0.25,
              "examples": ex(3.1)},
             {"task": "t", "method": "only_here", "budget": 0.25, "examples": ex(3.2)}]
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"cells": cells if name == "a" else cells[:2]}))
    return d


def test_versus_pairs_rows_by_example_and_flags_a_loss(tmp_path, capsys):
    a, b = _folder(tmp_path, "a", 0.0), _folder(tmp_path, "b", 0.05)
    (row,) = versus(a, b)  # 'none' and rows of one side only are left out
    assert row["method"] == "snapkv/bf16,int4_tok" and row["n"] == 12
    assert abs(row["after"] - row["before"] - 0.025) < 1e-9
    assert row["verdict"] == "worse"
    assert versus(a, a)[0]["verdict"] == "no significant difference"
    assert main([str(a), str(b), "--out", str(tmp_path / "v.md")]) == 0
    assert "| worse |" in (tmp_path / "v.md").read_text()
