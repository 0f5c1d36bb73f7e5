"""The worker's query ring (the observation window of each live request):
slots for live requests only, freed at finish *and* preemption, grown on
demand up to max_num_seqs, and running out is counted and logged.

Pure bookkeeping on the Compactor (no engine): the captured queries are
checked to survive the ring's growth unchanged."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.serving.worker import compactor as compactor_mod
from vllm_kvshrink.serving.worker import runner_patch
from vllm_kvshrink.serving.worker.compactor import Compactor

L, HQ, D, W = 2, 4, 16, 4


def _compactor(max_reqs: int) -> Compactor:
    caches = [torch.zeros(4, 2, 32, 2 * D, dtype=torch.bfloat16) for _ in range(L)]
    return Compactor(config=KVShrinkConfig(method="snapkv", obs_window=W),
                     layer_names=[f"l{i}" for i in range(L)], caches=caches,
                     scales=[1.0] * L, num_q_heads=HQ, head_size=D, max_reqs=max_reqs,
                     write_fn=None)


def _step(comp: Compactor, req_ids: list[str], step: int) -> None:
    """One decode step: one query per request, its value = request index * 100 + step."""
    cap = comp.plan_capture(req_ids, np.full(len(req_ids), step),
                            np.ones(len(req_ids), int))
    for name in comp.layer_names:
        q = torch.stack([torch.full((HQ * D,), float(int(r[1:]) * 100 + step))
                         for r in req_ids])
        if cap is not None:
            comp.capture_queries(cap, name, q)


def test_ring_grows_with_live_requests_and_keeps_their_queries():
    comp = _compactor(max_reqs=20)
    assert comp.capacity == compactor_mod.RING_START == 8
    first = [f"r{i}" for i in range(8)]
    for step in range(3):
        _step(comp, first, step)
    assert comp.qbuf.shape[1] == 8 * W
    _step(comp, first + ["r8"], 3)  # a ninth live request: the ring doubles
    assert comp.capacity == 16 and comp.qbuf.shape[1] == 16 * W
    for r in first:
        q, pos = comp.window(r)
        assert q.shape == (L, HQ, W, D)
        expect = torch.tensor([int(r[1:]) * 100 + s for s in range(4)], dtype=torch.bfloat16)
        assert torch.equal(q[0, 0, :, 0], expect), r
        assert list(pos) == [0, 1, 2, 3]
    q, pos = comp.window("r8")
    assert q.shape[2] == 1 and q[0, 0, 0, 0] == torch.tensor(803.0, dtype=torch.bfloat16)
    assert comp.ring_bytes(1) == L * W * HQ * D * 2 + W * 8


def test_running_out_is_counted_and_logged_then_freed_slots_are_reused(caplog):
    comp = _compactor(max_reqs=10)
    live = [f"r{i}" for i in range(10)]
    _step(comp, live, 0)
    assert comp.capacity == 10
    with caplog.at_level(logging.WARNING, logger="vllm.kvshrink"):
        _step(comp, live + ["r10"], 1)
        _step(comp, live + ["r10"], 2)
    assert comp.method_stats["ring_misses"] == 2
    assert sum("no query-ring slot for request r10" in m for m in caplog.messages) == 1
    comp.drop("r3")
    _step(comp, [r for r in live if r != "r3"] + ["r10"], 3)
    assert "r10" in comp.reqs and comp.method_stats["ring_misses"] == 2


@pytest.mark.parametrize("how", ["finished", "preempted"])
def test_finished_and_preempted_requests_give_their_slot_back(monkeypatch, how):
    comp = _compactor(max_reqs=8)
    _step(comp, ["r0", "r1"], 0)
    slot = comp.reqs["r1"].slot
    monkeypatch.setitem(runner_patch._ORIG, "_update_states", lambda self, out: None)
    runner = SimpleNamespace(_kvs_compactor=comp, requests={})
    out = SimpleNamespace(
        finished_req_ids={"r1"} if how == "finished" else set(),
        preempted_req_ids={"r1"} if how == "preempted" else None,
        scheduled_new_reqs=[],
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()))
    runner_patch._update_states(runner, out)
    assert "r1" not in comp.reqs and slot in comp.free_slots
    assert "r0" in comp.reqs


def test_a_step_of_tracked_decodes_is_copied_whole_and_others_are_gathered():
    """A decode step whose rows all go to the ring copies the step's rows as
    they are (``whole``); a step with a row left out (a request without a
    ring slot, a prefill longer than the window) gathers its rows, and both
    land the same values."""
    comp = _compactor(max_reqs=3)
    cap = comp.plan_capture(["r0", "r1"], np.zeros(2, int), np.ones(2, int))
    assert cap.whole and cap.src.tolist() == [0, 1]
    cap = comp.plan_capture(["r0", "r1", "r2", "r3"], np.ones(4, int), np.ones(4, int))
    assert not cap.whole and cap.src.tolist() == [0, 1, 2]  # r3: no slot left
    q = torch.arange(4 * HQ * D, dtype=torch.float32).view(4, HQ * D)
    comp.capture_queries(cap, "l1", q)
    got, _ = comp.window("r2")
    assert torch.equal(got[1, :, 0], q[2].view(HQ, D).to(torch.bfloat16))
    cap = comp.plan_capture(["r0"], np.full(1, 2), np.full(1, 2 * W))  # a prefill piece
    assert not cap.whole and cap.src.tolist() == list(range(W, 2 * W))
