"""The predictor-accuracy evaluation on real text: every signal is scored,
and each does much better than a random ranking would."""

from __future__ import annotations

import torch

from vllm_kvshrink.lab.eval.predictor import SIGNALS, example_ids, score_example
from vllm_kvshrink.methods.temporal import DEFAULT_WEIGHTS, SharedPredictor


def test_signals_beat_random_ranking_on_austen(hf_model, tokenizer):
    ids = example_ids(tokenizer, 1, 400, seed=0)[0]
    assert len(ids) == 400
    row = score_example(hf_model, ids, SharedPredictor(DEFAULT_WEIGHTS), horizon=16,
                        every=64)
    assert set(row) == {f"{s}_{m}" for s in SIGNALS for m in ("recall", "spearman")}
    for s in SIGNALS:
        # A random ranking finds 10% of the top 10% and has rank correlation 0.
        assert 0.3 < row[f"{s}_recall"] <= 1.0, row
        assert 0.3 < row[f"{s}_spearman"] <= 1.0, row
    # The untrained network is no better than chance: the test can fail.
    untrained = score_example(hf_model, ids, SharedPredictor(None, seed=3), 16, 64)
    assert untrained["temporal_recall"] < row["temporal_recall"]
    torch.testing.assert_close(torch.tensor(untrained["ema_recall"]),
                               torch.tensor(row["ema_recall"]))
