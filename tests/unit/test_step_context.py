"""The per-step context between the worker and attention: it rides on the
attention metadata vLLM builds for a step, outside a step the metadata carries
none, and attention does what it says (no engine)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from vllm_kvshrink.serving.worker import runner_patch, step_context
from vllm_kvshrink.serving.worker.step_context import StepContext


@dataclass
class _Metadata:
    num_actual_tokens: int


def _build(monkeypatch, per_layer):
    monkeypatch.setitem(runner_patch._ORIG, "_build_attention_metadata",
                        lambda self, *a, **k: (per_layer, None))


def test_the_step_rides_on_every_layer_and_is_gone_outside_a_step(monkeypatch):
    shared, other = _Metadata(3), _Metadata(3)
    _build(monkeypatch, {"l0": shared, "l1": shared, "l2": other})
    step = StepContext(capture=None, packed=None)
    runner = SimpleNamespace(_kvs_step=step)
    md, spec = runner_patch._build_attention_metadata(runner, 3, 1, 3)
    assert spec is None and all(step_context.of(m) is step for m in md.values())
    runner._kvs_step = None  # profiling / warm-up runs
    md, _ = runner_patch._build_attention_metadata(runner, 3, 1, 3)
    assert all(step_context.of(m) is None for m in md.values())


def test_micro_batches_each_carry_the_step(monkeypatch):
    parts = [{"l0": _Metadata(2)}, {"l0": _Metadata(1)}]
    _build(monkeypatch, parts)
    step = StepContext(capture=None, packed=None)
    md, _ = runner_patch._build_attention_metadata(SimpleNamespace(_kvs_step=step), 3, 2, 2)
    assert [step_context.of(p["l0"]) for p in md] == [step, step]


@pytest.mark.parametrize("with_step", [True, False])
def test_attention_captures_the_real_rows_only(monkeypatch, with_step):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from vllm_kvshrink.serving.attention.cpu import KVShrinkCPUAttentionBackendImpl

    monkeypatch.setattr(CPUAttentionBackendImpl, "forward",
                        lambda self, layer, q, k, v, cache, md, out, *a, **kw: out)
    seen, timed = [], []
    md = _Metadata(num_actual_tokens=3)
    if with_step:
        step_context.attach({"l0": md}, StepContext(
            capture=lambda name, q: seen.append((name, q.clone())), packed=None,
            timing=lambda phase, seconds: timed.append((phase, seconds))))
    impl = object.__new__(KVShrinkCPUAttentionBackendImpl)
    query = torch.arange(20.0).view(5, 4)  # 3 real rows, 2 of padding
    output = torch.zeros(5, 4)
    out = impl.forward(SimpleNamespace(layer_name="l0"), query, None, None, None, md, output)
    assert out is output and torch.equal(output, torch.zeros(5, 4))
    if with_step:
        assert len(seen) == 1 and seen[0][0] == "l0" and torch.equal(seen[0][1], query[:3])
        # its seconds go to the worker through the context's timing sink
        assert [p for p, _ in timed] == ["capture"] and timed[0][1] >= 0
    else:
        assert seen == timed == []
