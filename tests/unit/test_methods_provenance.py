"""The learned methods say where their weights come from: shipped weights
trained on another model, or a random init, are listed (and so logged and
counted by the worker), never silent."""

from __future__ import annotations

import pytest

from vllm_kvshrink.methods import semantic, temporal
from vllm_kvshrink.methods.provenance import foreign_weights


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(temporal, "_SHARED", {})
    monkeypatch.setattr(semantic, "_SHARED", {})


def test_shipped_weights_on_their_own_model_are_not_listed(fresh):
    temporal.shared_predictor()
    semantic.shared_embedding(64)
    assert foreign_weights("/root/.cache/vllm_kvshrink/models/SmolLM2-135M-Instruct") == []
    assert foreign_weights("HuggingFaceTB/SmolLM2-135M-Instruct/") == []


def test_shipped_weights_on_another_model_are_listed(fresh):
    temporal.shared_predictor()
    semantic.shared_embedding(64)
    lines = foreign_weights("meta-llama/Llama-3.2-1B")
    assert len(lines) == 2
    assert all("trained on SmolLM2-135M-Instruct, serving Llama-3.2-1B" in s for s in lines)


def test_random_projection_for_another_head_dim_is_listed(fresh):
    semantic.shared_embedding(128)  # the shipped projection is 64-dimensional
    (line,) = foreign_weights("meta-llama/Llama-3.2-1B")
    assert "semantic embedding (head_dim 128)" in line
    assert "random orthogonal init" in line and "learns online" in line


def test_nothing_listed_before_a_learned_method_is_used(fresh):
    assert foreign_weights("anything") == []
