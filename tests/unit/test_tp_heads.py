"""Decisions that span KV heads, with the heads split across ranks
(:mod:`vllm_kvshrink.policy.heads`).

The ranks here are threads exchanging through a barrier: the same protocol
(:class:`~vllm_kvshrink.policy.heads.ExchangeGroup`) the engine runs over
vLLM's tensor-parallel group, whose proof on the real engine is
``tests/engine/test_engine_tp.py``.  Each rank holds its share of the heads
of one cache; every rank's plan must be the single-process plan's rows.
"""

from __future__ import annotations

import threading

import pytest
import torch

from vllm_kvshrink.methods import Observation, build_method, compress_event
from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.policy.heads import LOCAL, ExchangeGroup, PeerFailed
from vllm_kvshrink.policy.record import merge_ranks
from vllm_kvshrink.storage.policy import levels_for, tier_event

L, HKV, G, N, W, D = 4, 3, 3, 96, 8, 64
STORAGE = ("bf16", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot")


class _Hub:
    """An all-gather of Python objects among ``n`` threads."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots = [None] * n
        self.calls = [0] * n

    def all_gather(self, rank, obj):
        self.calls[rank] += 1
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class _ThreadRank(ExchangeGroup):
    def __init__(self, hub: _Hub, size: int, rank: int) -> None:
        super().__init__(size, rank)
        self.hub = hub

    def all_gather(self, obj):
        return self.hub.all_gather(self.rank, obj)


def _run_ranks(size: int, fn):
    """``fn(group)`` on ``size`` threads, one rank each; their results (or
    exceptions) in rank order."""
    hub = _Hub(size)
    out = [None] * size

    def run(r):
        try:
            out[r] = fn(_ThreadRank(hub, size, r))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out, hub


def _cache(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, HKV, N, D, generator=g)
    keys[:, :, :, :4] *= torch.rand(L, HKV, N, 1, generator=g) * 6  # uneven norms
    values = torch.randn(L, HKV, N, D, generator=g)
    queries = torch.randn(L, HKV * G, W, D, generator=g)
    qpos = torch.arange(N - W, N)
    return keys, values, queries, qpos


def _obs(keys, queries, qpos, heads, rank=0, size=1):
    h = HKV // size
    return Observation(keys[:, rank * h:(rank + 1) * h], queries[:, rank * h * G:(rank + 1) * h * G],
                       qpos, [D ** -0.5] * L, heads=heads)


def _tiers(method_name, heads, rank, size, seed=0):
    keys, values, queries, qpos = _cache(seed)
    h = HKV // size
    method = build_method(KVShrinkConfig(method=method_name))
    obs = _obs(keys, queries, qpos, heads, rank, size)
    memo = {}
    heads.begin()
    plan = tier_event(method, obs, {}, levels_for(STORAGE), int(0.25 * N * 2 * 2 * D * L * HKV),
                      4, 16, values[:, rank * h:(rank + 1) * h], None, memo=memo)
    heads.agree()
    return plan, memo


@pytest.mark.parametrize("method", ["tova", "snapkv", "expected_attention", "adaptive"])
def test_tier_plan_split_over_ranks_is_the_single_process_plan(method):
    whole, memo = _tiers(method, LOCAL, 0, 1)
    parts, hub = _run_ranks(HKV, lambda grp: _tiers(method, grp, grp.rank, HKV))
    for r, part in enumerate(parts):
        assert not isinstance(part, BaseException), part
        plan, m = part
        assert plan.counts == whole.counts
        assert torch.equal(plan.level, whole.level[:, r:r + 1])
        assert m["distortion"] == pytest.approx(memo["distortion"], rel=1e-5)
    # every rank made the same exchanges: distortion, plan weights, fills, agreement
    assert len(set(hub.calls)) == 1 and hub.calls[0] >= 3


def _evict(method_name, heads, rank, size):
    keys, values, queries, qpos = _cache(1)
    h = HKV // size
    method = build_method(KVShrinkConfig(method=method_name))
    heads.begin()
    res = compress_event(method, _obs(keys, queries, qpos, heads, rank, size), {}, 40, 4, 16,
                         values=values[:, rank * h:(rank + 1) * h])
    heads.agree()
    return res.keep


def test_tova_eviction_split_over_ranks_keeps_the_layer_choice():
    whole = _evict("tova", LOCAL, 0, 1)
    parts, _ = _run_ranks(HKV, lambda grp: _evict("tova", grp, grp.rank, HKV))
    got = torch.cat(parts, 1)
    assert torch.equal(got, whole)
    # TOVA keeps one set per layer: a rank-local mean would keep three
    assert all(torch.equal(got[:, 0], got[:, i]) for i in range(HKV))


def test_a_failure_on_one_rank_falls_back_on_every_rank_and_the_next_event_runs():
    keys, values, queries, qpos = _cache(2)

    def events(grp):
        outcome = []
        for ev in range(3):
            grp.begin()
            try:
                if ev == 1 and grp.rank == 2:
                    raise RuntimeError("injected")
                method = build_method(KVShrinkConfig(method="tova"))
                res = compress_event(method, _obs(keys, queries, qpos, grp, grp.rank, HKV), {},
                                     40, 4, 16, values=values[:, grp.rank:grp.rank + 1])
                grp.agree()
                outcome.append(("ok", res.keep.shape[-1]))
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, PeerFailed):
                    grp.fail(repr(e))
                outcome.append((type(e).__name__, str(e)))
        return outcome

    parts, hub = _run_ranks(HKV, events)
    for r, part in enumerate(parts):
        assert not isinstance(part, BaseException), part
        assert part[0] == ("ok", 40) and part[2] == ("ok", 40)
        if r == 2:
            assert part[1][0] == "RuntimeError"
        else:
            assert part[1][0] == "PeerFailed" and "rank 2 failed" in part[1][1]
            assert "injected" in part[1][1]
    assert len(set(hub.calls)) == 1


def test_no_exchange_outside_an_event():
    grp = _ThreadRank(_Hub(1), 1, 0)
    with pytest.raises(RuntimeError, match="outside an event"):
        grp.agree()
    grp.begin()
    grp.agree()
    grp.fail("after agreement: nothing to tell")  # no exchange, no error
    assert grp.hub.calls == [1]


def test_records_of_the_ranks_merge_into_the_single_process_record():
    whole = {"req_id": "a", "epoch": 0, "logical_len": 9, "keep": 2, "method": "tova",
             "kept": [[[0, 5], [1, 5], [0, 8]], [[2, 3], [4, 6], [0, 1]]],
             "level": [[[0, 1], [0, 2], [1, 1]], [[0, 0], [2, 2], [1, 0]]],
             "counts": [1, 1], "bytes": 300, "budget_bytes": 400}
    parts = []
    for r in (2, 0, 1):  # any file order
        p = dict(whole, tp_rank=r, tp_size=3, bytes=100)
        p["kept"] = [layer[r:r + 1] for layer in whole["kept"]]
        p["level"] = [layer[r:r + 1] for layer in whole["level"]]
        parts.append(p)
    assert merge_ranks(parts) == whole
    with pytest.raises(ValueError, match="ranks \\[0, 2\\] of 3"):
        merge_ranks([parts[0], parts[1]])
    bad = dict(parts[0], counts=[2, 0])
    with pytest.raises(ValueError, match="disagree on 'counts'"):
        merge_ranks([bad, parts[1], parts[2]])


def test_thread_binding_for_more_ranks_than_numa_nodes(monkeypatch):
    from vllm_kvshrink.lab.bench import launch

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("glob.glob", lambda pattern: ["/sys/devices/system/node/node0"])
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda _: {0, 1})
    assert launch.tp_thread_binding(1) == {}
    assert launch.tp_thread_binding(3) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda _: set(range(8)))
    assert launch.tp_thread_binding(2) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3|4,5,6,7"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    assert launch.tp_thread_binding(3) == {}  # the user's setting stands


def test_each_rank_saves_its_online_trained_predictor_to_its_own_file(tmp_path):
    """Ranks train on their own heads: rank 0 saves where asked, rank r to
    ``<path>.tp<r>``, so no two ranks write one file."""
    from types import SimpleNamespace

    from vllm_kvshrink.serving.worker.compactor import Compactor

    path = str(tmp_path / "pred.pt")
    plan = SimpleNamespace(method="temporal", pool_kernel=7,
                           method_args={"predictor_save": path})
    saved = []
    for rank in (0, 2):
        comp = Compactor(config=KVShrinkConfig(method="temporal"), layer_names=["l0"],
                         caches=[torch.zeros(4, 1, 32, 2 * D)], scales=[1.0],
                         num_q_heads=G, head_size=D, max_reqs=2, write_fn=None,
                         heads=_ThreadRank(_Hub(3), 3, rank))
        saved.append(comp.method_for(plan).save_path)
    assert saved == [path, path + ".tp2"]
