"""Exact block bookkeeping of the compaction protocol, on vLLM's real
scheduler with a tiny spec; the worker is replaced by hand-written
ModelRunnerOutputs (pure bookkeeping: no tensors are involved)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvshrink.serving import plan as plan_mod

BS = 16
NUM_BLOCKS = 24


@pytest.fixture
def make_scheduler(model_path, monkeypatch):
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401 (import order)
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_kvshrink import config
    from vllm_kvshrink.config import KVShrinkConfig
    from vllm_kvshrink.serving.core.scheduler import KVShrinkScheduler

    def make(batched=512, **env):
        for k in list(__import__("os").environ):
            if k.startswith("VLLM_KVSHRINK_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv("VLLM_KVSHRINK_" + k, str(v))
        # What vllm_kvshrink.register() does in an engine process.
        monkeypatch.setattr(config, "_CURRENT", None)
        config.set_current(KVShrinkConfig.from_env())
        model_config = ModelConfig(model=model_path, dtype="float32", max_model_len=512,
                                   seed=0)
        scheduler_config = SchedulerConfig(
            max_num_seqs=8, max_num_batched_tokens=batched, max_model_len=512,
            is_encoder_decoder=False)
        cache_config = CacheConfig(block_size=BS, cache_dtype="auto",
                                   enable_prefix_caching=True)
        vllm_config = VllmConfig(model_config=model_config, cache_config=cache_config,
                                 scheduler_config=scheduler_config)
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=64,
                                 dtype=torch.float32)
        kv_cache_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        cache_config.num_gpu_blocks = NUM_BLOCKS
        return KVShrinkScheduler(
            vllm_config=vllm_config, kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(vllm_config),
            block_size=BS, log_stats=True)

    return make


def _request(req_id, n_prompt, max_tokens=20, extra=None, start=0):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                        extra_args={"kvshrink": extra} if extra else None)
    return Request(req_id, list(range(start, start + n_prompt)), sp, None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def _output(sched_out, results=None):
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(sched_out.num_scheduled_tokens)
    out = ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[7] for _ in ids])
    if results is not None:
        setattr(out, plan_mod.RESULTS_ATTR, results)
    return out


def _blocks(s, req_id):
    return [b.block_id for b in s._kvs_single.req_to_blocks[req_id]]


def test_compaction_frees_exactly_the_tail(make_scheduler):
    s = make_scheduler(METHOD="snapkv", BUDGET=32, SLACK_TOKENS=0, RECENT_TOKENS=8,
                       OBS_WINDOW=4, SINK_TOKENS=2)
    s.add_request(_request("a", 100))
    free0 = s._kvs_pool.get_num_free_blocks()
    out = s.schedule()
    step = getattr(out, plan_mod.ATTR)
    # Prefill of 100 tokens: 7 blocks; plan keeps 32 tokens = 2 blocks.
    assert len(_blocks(s, "a")) == 7
    (c,) = step.compactions
    assert (c.old_len, c.keep, c.logical_len) == (100, 32, 100)
    assert c.block_ids == _blocks(s, "a")[:2]
    assert step.offsets == {}  # offsets change only after the worker succeeds
    tail = _blocks(s, "a")[2:]
    s.update_from_output(out, _output(out, {"a": True}))
    assert _blocks(s, "a") == c.block_ids
    assert s.kvs_state["a"].offset == 68
    assert s._kvs_pool.get_num_free_blocks() == free0 - 2
    assert s.kvs_counters.blocks_freed == len(tail) == 5
    assert s.kvs_counters.tokens_evicted == 68
    # Next step: the decode token goes to a fresh block at physical 32.
    out = s.schedule()
    assert getattr(out, plan_mod.ATTR).offsets == {"a": 68}
    new = out.scheduled_cached_reqs.new_block_ids[0][0]
    assert len(new) == 1 and new[0] not in c.block_ids
    s.update_from_output(out, _output(out))
    s.finish_requests(["a"], __import__("vllm.v1.request", fromlist=["x"]).RequestStatus.FINISHED_ABORTED)
    assert s._kvs_pool.get_num_free_blocks() == free0


def test_split_prompt_is_compressed_at_its_end(make_scheduler):
    """A prompt the step's token budget splits (another prefill took most of
    it) waits for its end while it and the rest of it fit the budget, the
    slack and one chunk (cadence.waits_for_prompt): one event, on the whole
    prompt, not one after its first piece as well."""
    from vllm.v1.outputs import ModelRunnerOutput

    s = make_scheduler(batched=128, METHOD="snapkv", BUDGET=16, SLACK_TOKENS=0,
                       RECENT_TOKENS=8, OBS_WINDOW=4, SINK_TOKENS=2)
    s.add_request(_request("a", 100))
    s.add_request(_request("b", 120, start=1000))
    out = s.schedule()
    assert dict(out.num_scheduled_tokens) == {"a": 100, "b": 28}
    # b holds 28 of 120: 28 + 92 <= 16 + 0 + 128, so only a (prompt done) is due
    assert [c.req_id for c in getattr(out, plan_mod.ATTR).compactions] == ["a"]
    res = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1},
                            sampled_token_ids=[[7], []])
    setattr(res, plan_mod.RESULTS_ATTR, {"a": True})
    s.update_from_output(out, res)
    out = s.schedule()
    assert out.num_scheduled_tokens["b"] == 92
    (c,) = [c for c in getattr(out, plan_mod.ATTR).compactions if c.req_id == "b"]
    assert (c.old_len, c.logical_len, c.keep) == (120, 120, 16)


def test_failed_compaction_changes_nothing(make_scheduler):
    s = make_scheduler(METHOD="snapkv", BUDGET=32, SLACK_TOKENS=0, RECENT_TOKENS=8,
                       OBS_WINDOW=4)
    s.add_request(_request("a", 100))
    out = s.schedule()
    before = _blocks(s, "a")
    s.update_from_output(out, _output(out, {"a": "RuntimeError: boom"}))
    assert _blocks(s, "a") == before
    assert s.kvs_state["a"].offset == 0 and s.kvs_state["a"].disabled
    assert s.kvs_counters.fallbacks == 1 and s.kvs_counters.compactions == 0
    out = s.schedule()  # a disabled request is never planned again
    assert getattr(out, plan_mod.ATTR).compactions == []


def test_shared_blocks_are_copied_not_rewritten(make_scheduler):
    """'b' shares its prompt blocks with 'a' through the prefix cache: its kept
    region gets copy-on-write twins, and the shared originals stay with 'a'."""
    s = make_scheduler(METHOD="snapkv", BUDGET=32, SLACK_TOKENS=0, RECENT_TOKENS=8,
                       OBS_WINDOW=4)
    s.add_request(_request("a", 100, extra={"method": "none"}))
    out = s.schedule()
    s.update_from_output(out, _output(out))
    a_blocks = _blocks(s, "a")
    s.add_request(_request("b", 100))
    out = s.schedule()
    b_blocks = _blocks(s, "b")
    assert b_blocks[:6] == a_blocks[:6]  # 6 full blocks hit the cache
    (c,) = getattr(out, plan_mod.ATTR).compactions
    assert c.req_id == "b"
    assert not set(c.block_ids) & set(a_blocks)  # twins, not the shared blocks
    s.update_from_output(out, _output(out, {"b": True}))
    assert _blocks(s, "b") == c.block_ids
    assert _blocks(s, "a") == a_blocks
    for bid in a_blocks:
        assert s._kvs_pool.blocks[bid].ref_cnt == 1
    assert s.kvs_counters.cow_blocks == 2


def test_bad_per_request_setting_is_served_uncompressed(make_scheduler):
    s = make_scheduler(METHOD="snapkv", BUDGET=64)
    s.add_request(_request("a", 100, extra={"budget": -1}))
    assert not s.kvs_state["a"].cfg.enabled


# ------------------------------------------------------------ tiered storage
TIER_ENV = dict(METHOD="snapkv", BUDGET=0.25, STORAGE="bf16,int4_tok", SLACK_TOKENS=0,
                RECENT_TOKENS=8, OBS_WINDOW=4, SINK_TOKENS=2)


def test_tier_event_frees_exactly_the_blocks_the_layout_leaves(make_scheduler):
    """A tier event names the request's row and the blocks it may write; the
    worker's result (here written by hand) says which hold what; every other
    block goes back to the pool, the packed ones stay owned outside the row."""
    s = make_scheduler(**TIER_ENV)
    s.add_request(_request("a", 100))
    free0 = s._kvs_pool.get_num_free_blocks()
    out = s.schedule()
    (ev,) = getattr(out, plan_mod.ATTR).tier_events
    row = _blocks(s, "a")
    assert (ev.old_len, ev.logical_len, ev.plain_blocks) == (100, 100, row)
    assert ev.dest_blocks[: len(row)] == row  # owned alone: all of them
    assert ev.storage == ("bf16", "int4_tok")
    # budget: 25 % of 100 tokens' bf16 bytes (1 layer x 1 head x 256 B)
    assert ev.budget_bytes == 25 * 256
    # 10 tokens bf16 (sinks + recent), 52 int4: 1 plain block, 1 packed block
    res = plan_mod.TierResult(plain_blocks=[row[0]], segments=[(row[3], "int4_tok", 52)],
                              counts={"bf16": 10, "int4_tok": 52}, demoted=52, evicted=38)
    s.update_from_output(out, _output(out, {"a": res}))
    st = s.kvs_state["a"]
    assert _blocks(s, "a") == [row[0]]
    assert [b.block_id for b in st.packed] == [row[3]] and st.segments == res.segments
    assert st.offset == 90  # logical 100 - 10 plain tokens
    assert s._kvs_pool.get_num_free_blocks() == free0 - 2
    assert s.kvs_counters.tier_events == 1 and s.kvs_counters.tokens_demoted == 52
    assert s.kvs_counters.blocks_freed == len(row) - 2
    for b in [row[0], row[3]]:
        assert s._kvs_pool.blocks[b].ref_cnt == 1
    # The next step carries the offset; the packed block is not in the row.
    out = s.schedule()
    assert getattr(out, plan_mod.ATTR).offsets == {"a": 90}
    s.update_from_output(out, _output(out))
    from vllm.v1.request import RequestStatus

    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s._kvs_pool.get_num_free_blocks() == free0
    # The packed block is zeroed by the worker before it is written again.
    out = s.schedule()
    assert row[3] in getattr(out, plan_mod.ATTR).zero_blocks


def test_failed_tier_event_gives_back_what_it_took(make_scheduler):
    s = make_scheduler(**TIER_ENV)
    s.add_request(_request("a", 100))
    free0 = s._kvs_pool.get_num_free_blocks()
    out = s.schedule()
    (ev,) = getattr(out, plan_mod.ATTR).tier_events
    before = _blocks(s, "a")
    s.update_from_output(out, _output(out, {"a": "RuntimeError: boom"}))
    st = s.kvs_state["a"]
    assert _blocks(s, "a") == before and st.packed == [] and st.disabled
    assert s.kvs_counters.fallbacks == 1
    # only the row is held (fresh destination blocks, if any, went back)
    assert s._kvs_pool.get_num_free_blocks() == free0 - len(before)
    assert ev.req_id == "a"


def test_tier_admission_counts_packed_blocks(make_scheduler):
    s = make_scheduler(**TIER_ENV)
    geo = s.kvs_tiers
    cfg = s.kvs_config
    # 4000 tokens at 25 %: 1000 tokens' bf16 bytes.  The least dense level is
    # bf16 (16 tokens x 256 B per block; int4_tok: 113 x 72 B in a 16-token
    # fp32 page), so at most 256000 // 4096 = 62 full blocks + one partly
    # filled block per level; plus 64 tokens of a prefill chunk: 4 + 1 blocks.
    assert geo.capacity("int4_tok") == 113
    assert geo.block_bound(cfg, 256000) == 64
    assert geo.peak_blocks(cfg, 4000, 64) == 69 < -(-4000 // BS)
    assert geo.peak_blocks(cfg, 100, 512) == -(-100 // BS)  # never above uncompressed


def test_seconds_per_phase_join_the_counters(make_scheduler):
    """The worker's phases, as it last reported them, and the scheduler's own
    bookkeeping time travel together in the stats."""
    from vllm_kvshrink.serving.metrics.counters import STATS_KEY

    s = make_scheduler(METHOD="snapkv", BUDGET=32, SLACK_TOKENS=0, RECENT_TOKENS=8,
                       OBS_WINDOW=4, SINK_TOKENS=2)
    s.add_request(_request("a", 100))
    out = s.schedule()
    worker = _output(out, {"a": True})
    setattr(worker, plan_mod.METHOD_STATS_ATTR,
            {"merged_tokens": 0, "compaction_s": 0.5,
             "phase_seconds": {"scoring": 0.25, "move": 0.25, "capture": 0.125}})
    s.update_from_output(out, worker)
    seconds = s.kvs_counters.seconds
    assert {k: seconds[k] for k in ("scoring", "move", "capture")} == {
        "scoring": 0.25, "move": 0.25, "capture": 0.125}
    assert seconds["scheduler"] > 0
    own = seconds["scheduler"]
    stats = s.make_stats()
    assert stats.kv_connector_stats[STATS_KEY]["seconds"]["scoring"] == 0.25
    assert s.kvs_counters.seconds["scheduler"] > own  # make_stats is ours too
