"""Scheduler that keeps each request's KV cache within its budget.

Bookkeeping only -- no tensors.  After vLLM has scheduled a step, requests
whose cache will have grown past ``budget + slack`` by the end of that step get
a :class:`~vllm_kvshrink.serving.plan.Compaction`.  The worker runs the step's forward
pass unchanged, then scores the cache and moves the kept tokens to the front of
the request's blocks, and reports back.  Only then does the bookkeeping move::

    schedule N     vLLM schedules; then plan R: keep K of P' (P' includes step N)
                   shared blocks of the kept region get copy-on-write twins,
                   rewritten blocks leave the prefix cache
    execute N      forward as stock; afterwards the worker moves K tokens into
                   the kept region and cuts R's block-table row to it
    update N       ok  -> offset += P'-K, blocks past the region back to the pool
                   err -> nothing moved: release the twins, count, leave R alone
    schedule N+1   R's new tokens get fresh, unshared, uncached blocks

``request.num_computed_tokens`` stays logical (stop conditions, positions,
``max_model_len``); ``offset`` = logical - physical is what block accounting
subtracts.  Compressed requests never add blocks to the prefix cache: a
compacted block no longer holds what its hash describes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvshrink import config as config_mod
from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError
from vllm_kvshrink.policy import cadence
from vllm_kvshrink.policy.checks import check_cache_dtype, check_streaming, request_config
from vllm_kvshrink.policy.nbytes import request_peak_blocks
from vllm_kvshrink.serving import compat
from vllm_kvshrink.serving import plan as plan_mod
from vllm_kvshrink.serving.metrics import phases
from vllm_kvshrink.serving.metrics.counters import STATS_KEY, Counters
from vllm_kvshrink.storage.geometry import TierGeometry

logger = logging.getLogger("vllm.kvshrink")


@dataclass
class _ReqState:
    cfg: KVShrinkConfig
    offset: int = 0
    compressed: bool = False  # ever compacted since the last (re)start
    disabled: bool = False  # a compaction failed: leave it alone
    pending: plan_mod.Compaction | None = None
    pending_cow: list = field(default_factory=list)  # new blocks (KVCacheBlock)
    pending_replaced: list = field(default_factory=list)  # shared blocks they replace
    # tiered storage: packed blocks (KVCacheBlock, outside req_to_blocks, so
    # vLLM's accounting of the plain row is untouched) and their contents
    packed: list = field(default_factory=list)
    segments: list = field(default_factory=list)  # (block_id, form, n)
    pending_tier: plan_mod.TierEvent | None = None
    pending_fresh: list = field(default_factory=list)  # blocks taken for it


def check_supported(vllm_config, kv_cache_config) -> None:
    """Refuse configurations the compaction path cannot keep consistent."""
    groups = kv_cache_config.kv_cache_groups
    model = vllm_config.model_config.model
    if len(groups) != 1:
        raise KVShrinkConfigError(
            f"model {model!r} has {len(groups)} KV-cache groups (hybrid or "
            f"sliding-window layers); VLLM_KVSHRINK_METHOD supports models with "
            f"one full-attention group only (set VLLM_KVSHRINK_METHOD=none)"
        )
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or getattr(spec, "sliding_window", None):
        raise KVShrinkConfigError(
            f"model {model!r} uses {type(spec).__name__}; VLLM_KVSHRINK_METHOD "
            f"supports full attention (FullAttentionSpec) only "
            f"(set VLLM_KVSHRINK_METHOD=none)"
        )
    if vllm_config.speculative_config is not None:
        raise KVShrinkConfigError(
            "speculative decoding is not supported together with "
            "VLLM_KVSHRINK_METHOD (set one of them off)"
        )
    if vllm_config.kv_transfer_config is not None:
        raise KVShrinkConfigError(
            "KV connectors (kv_transfer_config) are not supported together with "
            "VLLM_KVSHRINK_METHOD (set one of them off)"
        )
    pc = vllm_config.parallel_config
    tp = pc.tensor_parallel_size
    heads = vllm_config.model_config.get_total_num_kv_heads()
    if tp > 1 and heads % tp:
        # vLLM would replicate KV heads across ranks: the ranks' heads would
        # no longer add up to the model's, which every cross-head decision
        # (policy.heads) relies on.
        raise KVShrinkConfigError(
            f"tensor_parallel_size={tp} does not divide the {heads} KV heads of "
            f"model {model!r} (vLLM would replicate KV heads across ranks), which "
            f"VLLM_KVSHRINK_METHOD does not support; allowed: a tensor_parallel_size "
            f"that divides {heads}, or set VLLM_KVSHRINK_METHOD=none")
    if pc.pipeline_parallel_size > 1 or getattr(pc, "decode_context_parallel_size", 1) > 1 \
            or getattr(pc, "prefill_context_parallel_size", 1) > 1:
        raise KVShrinkConfigError(
            f"pipeline_parallel_size={pc.pipeline_parallel_size} / context "
            f"parallelism is not supported together with VLLM_KVSHRINK_METHOD; "
            f"allowed: pipeline_parallel_size=1 and no context parallelism, or "
            f"set VLLM_KVSHRINK_METHOD=none")


class KVShrinkScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kvs_config = config_mod.current()
        check_supported(self.vllm_config, self.kv_cache_config)
        compat.check_attributes("scheduler", self)
        compat.check_attributes("single_type_manager",
                                self.kv_cache_manager.coordinator.single_type_managers[0])
        compat.check_attributes("block_pool", self.kv_cache_manager.block_pool)
        compat.check_attributes("block", self.kv_cache_manager.block_pool.blocks[0])
        self.kvs_cache_dtype = self.vllm_config.cache_config.cache_dtype
        check_cache_dtype(self.kvs_config, self.kvs_cache_dtype)
        self.kvs_block_size = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self.kvs_state: dict[str, _ReqState] = {}
        self.kvs_tiers = TierGeometry.of(
            self.kv_cache_config, self.kvs_block_size,
            self.vllm_config.parallel_config.tensor_parallel_size)
        self._kvs_zero: list[int] = []  # packed blocks freed since the last step
        self.kvs_counters = Counters()
        #: the worker's latest statistics as it reported them
        #: (:meth:`~vllm_kvshrink.serving.worker.compactor.Compactor.report_stats`;
        #: empty before its first report)
        self.kvs_worker_stats: dict = {}
        manager = self.kv_cache_manager
        self._kvs_single = manager.coordinator.single_type_managers[0]
        self._kvs_pool = manager.block_pool
        original = manager.allocate_slots

        def allocate_slots(request, num_new_tokens, *a, **kw):
            st = self.kvs_state.get(request.request_id)
            if kw.get("full_sequence_must_fit") and self._kvs_compressible(st):
                # Admission: what must fit is the request's compressed peak,
                # not its full length -- that is what lets a prompt longer
                # than the pool be served.
                if self._kvs_remaining_blocks(request, st) > (
                    self._kvs_pool.get_num_free_blocks()
                    - kw.get("reserved_blocks", 0)
                ):
                    return None
                kw["full_sequence_must_fit"] = False
            if st is None or not st.compressed:
                return original(request, num_new_tokens, *a, **kw)
            # Physical length for block accounting; never cache blocks whose
            # content no longer matches the logical prefix they hash.
            if len(a) >= 5:  # (num_new_computed_tokens, new_computed_blocks,
                # num_lookahead_tokens, num_external_computed_tokens,
                # delay_cache_blocks, ...) passed positionally
                a = a[:4] + (True,) + a[5:]
            else:
                kw["delay_cache_blocks"] = True
            logical = request.num_computed_tokens
            request.num_computed_tokens = logical - st.offset
            try:
                return original(request, num_new_tokens, *a, **kw)
            finally:
                request.num_computed_tokens = logical

        manager.allocate_slots = allocate_slots
        logger.info(
            "vllm-kvshrink scheduler: method=%s budget=%s sinks=%d recent=%d "
            "slack=%d block_size=%d",
            self.kvs_config.method, self.kvs_config.budget,
            self.kvs_config.sink_tokens, self.kvs_config.recent_tokens,
            self.kvs_config.slack_tokens, self.kvs_block_size,
        )

    # ----------------------------------------------------------- requests
    def add_request(self, request) -> None:
        if request.request_id in self.kvs_state and request.request_id in self.requests:
            # A streaming-input session's next chunk for a live request: it
            # keeps its state (the front end refuses compressed sessions).
            return super().add_request(request)
        with self._kvs_timed():
            self.kvs_state[request.request_id] = _ReqState(cfg=self._kvs_config_of(request))
        super().add_request(request)

    def _kvs_config_of(self, request) -> KVShrinkConfig:
        """The settings ``request`` runs with (its own overrides; ``none``
        when they are refused)."""
        sp = getattr(request, "sampling_params", None)
        try:
            cfg = request_config(self.kvs_config, sp.extra_args if sp is not None else None,
                                 self.kvs_cache_dtype)
        except KVShrinkConfigError as e:
            # The front-end validates first; this is a second line of defence.
            logger.error("request %s: %s; serving it uncompressed",
                         request.request_id, e)
            cfg = self.kvs_config.with_overrides({"method": "none"})
        try:
            check_streaming(cfg, getattr(request, "resumable", False))
        except KVShrinkConfigError:
            # Second line of defence as above (patches._check_streaming).
            logger.error("request %s: streaming-input session; serving it "
                         "uncompressed", request.request_id)
            cfg = self.kvs_config.with_overrides({"method": "none"})
        return cfg

    def _free_request(self, request, *args, **kwargs):
        with self._kvs_timed():
            st = self.kvs_state.pop(request.request_id, None)
            if st is not None:
                self._kvs_release_pending(st, success=False)
                self._kvs_release_packed(st)
        return super()._free_request(request, *args, **kwargs)

    def _preempt_request(self, request, timestamp, *args, **kwargs):
        with self._kvs_timed():
            st = self.kvs_state.get(request.request_id)
            if st is not None:
                self._kvs_release_pending(st, success=False)
        super()._preempt_request(request, timestamp, *args, **kwargs)
        if st is not None:
            with self._kvs_timed():
                # Preemption frees every block and recomputes from scratch.
                self._kvs_release_packed(st)
                st.offset = 0
                st.compressed = False

    # ------------------------------------------------------------ admission
    @staticmethod
    def _kvs_compressible(st: _ReqState | None) -> bool:
        return st is not None and st.cfg.enabled and not st.disabled

    def _kvs_remaining_blocks(self, request, st: _ReqState) -> int:
        with self._kvs_timed():
            num_tokens = min(request.num_tokens, self.max_model_len)
            chunk = self.scheduler_config.max_num_batched_tokens
            peak_blocks = request_peak_blocks(st.cfg, num_tokens, self.kvs_block_size,
                                              chunk, self.kvs_tiers)
            have = len(self._kvs_single.req_to_blocks.get(request.request_id, ()))
            return max(0, peak_blocks - have - len(st.packed))

    def _request_remaining_blocks(self, request) -> int:
        st = self.kvs_state.get(request.request_id)
        if self._kvs_compressible(st):
            return self._kvs_remaining_blocks(request, st)
        return super()._request_remaining_blocks(request)

    # ------------------------------------------------------------ planning
    def _kvs_plan(self) -> tuple[list[plan_mod.Compaction], list[plan_mod.TierEvent]]:
        bs = self.kvs_block_size
        plans, tier_events = [], []
        for request in self.running:
            st = self.kvs_state.get(request.request_id)
            if (st is None or st.disabled or not st.cfg.enabled or st.pending
                    or st.pending_tier):
                continue
            cfg = st.cfg
            if cfg.tiered:
                ev = self._kvs_plan_tier(request, st)
                if ev is not None:
                    tier_events.append(ev)
                continue
            logical = request.num_computed_tokens
            physical = logical - st.offset
            keep = cadence.tokens_to_keep(cfg, physical, logical,
                                           request.num_prompt_tokens, bs,
                                           self.scheduler_config.max_num_batched_tokens)
            if keep is None:
                continue
            blocks = self._kvs_single.req_to_blocks[request.request_id]
            num_keep_blocks = cdiv(keep, bs)
            if len(blocks) < cdiv(physical, bs):
                continue  # bookkeeping not what we expect: leave it alone
            region = []
            cow, replaced = [], []
            for blk in blocks[:num_keep_blocks]:
                if blk.ref_cnt > 1:
                    # Shared through the prefix cache: copy on write.
                    if self._kvs_pool.get_num_free_blocks() < 1:
                        break
                    new = self._kvs_pool.get_new_blocks(1)[0]
                    cow.append(new)
                    replaced.append(blk)
                    region.append(new)
                else:
                    region.append(blk)
            if len(region) < num_keep_blocks:
                self._kvs_pool.free_blocks(cow)
                continue
            # Blocks rewritten in place no longer match their prefix hash.
            rewritten = {b.block_id for b in region if b not in cow}
            if rewritten:
                self._kvs_pool.evict_blocks(rewritten)
            comp = plan_mod.Compaction(
                req_id=request.request_id,
                old_len=physical,
                keep=keep,
                logical_len=logical,
                block_ids=[b.block_id for b in region],
                method=cfg.method,
                sink_tokens=cfg.sink_tokens,
                recent_tokens=cfg.recent_tokens,
                pool_kernel=cfg.pool_kernel,
                method_args=dict(cfg.method_args),
            )
            st.pending = comp
            st.pending_cow = cow
            st.pending_replaced = replaced
            plans.append(comp)
        return plans, tier_events

    def _kvs_plan_tier(self, request, st: _ReqState) -> plan_mod.TierEvent | None:
        """A tier event for ``request`` if its bytes are due (the rule of
        :func:`vllm_kvshrink.policy.cadence.bytes_due`, as in the research path)."""
        geo, cfg, bs = self.kvs_tiers, st.cfg, self.kvs_block_size
        logical = request.num_computed_tokens
        plain = logical - st.offset
        budget = geo.due(cfg, plain, st.segments, logical, request.num_prompt_tokens,
                         self.scheduler_config.max_num_batched_tokens)
        if budget is None:
            return None
        blocks = self._kvs_single.req_to_blocks[request.request_id]
        if len(blocks) < cdiv(plain, bs):
            return None  # bookkeeping not what we expect: leave it alone
        # Destinations: blocks only this request holds (the worker reads every
        # token before it writes any), then fresh ones up to the bound.
        owned = [b for b in blocks if b.ref_cnt == 1] + list(st.packed)
        need = geo.block_bound(cfg, budget) - len(owned)
        fresh = []
        if need > 0:
            if self._kvs_pool.get_num_free_blocks() < need:
                return None  # try again next step
            fresh = self._kvs_pool.get_new_blocks(need)
        if owned:  # rewritten: no longer what their prefix hash describes
            self._kvs_pool.evict_blocks({b.block_id for b in owned})
        ev = plan_mod.TierEvent(
            req_id=request.request_id, old_len=plain, logical_len=logical,
            plain_blocks=[b.block_id for b in blocks[:cdiv(plain, bs)]],
            segments=list(st.segments),
            dest_blocks=[b.block_id for b in owned + fresh],
            budget_bytes=budget, storage=tuple(cfg.storage), method=cfg.method,
            sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens,
            pool_kernel=cfg.pool_kernel, method_args=dict(cfg.method_args))
        st.pending_tier = ev
        st.pending_fresh = fresh
        return ev

    def schedule(self, *args: Any, **kwargs: Any):
        output = super().schedule(*args, **kwargs)
        with self._kvs_timed():
            setattr(output, plan_mod.ATTR, self._kvs_step_plan())
        return output

    def _kvs_step_plan(self) -> plan_mod.StepPlan:
        """This step's plan, after vLLM's own scheduling: preempted requests
        are gone from `running`, prefix-cache hits of this step are counted
        in ref_cnt, and num_computed_tokens includes this step's tokens."""
        compactions, tier_events = self._kvs_plan()
        offsets = {
            r.request_id: self.kvs_state[r.request_id].offset
            for r in self.running
            if r.request_id in self.kvs_state and self.kvs_state[r.request_id].offset
        }
        step = plan_mod.StepPlan(compactions=compactions, tier_events=tier_events,
                                 offsets=offsets, zero_blocks=self._kvs_zero)
        self._kvs_zero = []
        return step

    # ------------------------------------------------------------- results
    def _kvs_release_packed(self, st: _ReqState) -> None:
        if st.packed:
            self._kvs_zero.extend(b.block_id for b in st.packed)
            self._kvs_pool.free_blocks(reversed(st.packed))
        st.packed, st.segments = [], []

    def _kvs_release_pending(self, st: _ReqState, success: bool) -> None:
        if st.pending_tier is not None and not success:
            if st.pending_fresh:
                self._kvs_pool.free_blocks(st.pending_fresh)
            st.pending_tier, st.pending_fresh = None, []
        if st.pending is None:
            return
        req_id = st.pending.req_id
        if success:
            # The copies now hold the data: swap them into the request's
            # block list and drop the request's reference to the originals.
            blocks = self._kvs_single.req_to_blocks.get(req_id)
            if blocks is not None and st.pending_cow:
                swap = {id(old): new for old, new in zip(st.pending_replaced, st.pending_cow)}
                blocks[:] = [swap.get(id(b), b) for b in blocks]
                self._kvs_pool.free_blocks(st.pending_replaced)
        else:
            if st.pending_cow:
                self._kvs_pool.free_blocks(st.pending_cow)
        st.pending = None
        st.pending_cow = []
        st.pending_replaced = []

    def update_from_output(self, scheduler_output, model_runner_output):
        with self._kvs_timed():
            self._kvs_update(scheduler_output, model_runner_output)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _kvs_update(self, scheduler_output, model_runner_output) -> None:
        """The worker's statistics and this step's results, before vLLM's
        own update."""
        step = getattr(scheduler_output, plan_mod.ATTR, None)
        ms = getattr(model_runner_output, plan_mod.METHOD_STATS_ATTR, None)
        if ms:
            self.kvs_worker_stats = dict(ms)
            c = self.kvs_counters
            c.seconds.update(ms.get("phase_seconds") or {})
            c.tokens_merged = round(ms.get("merged_tokens", 0))
            c.ring_misses = int(ms.get("ring_misses", 0))
            c.foreign_weights = int(ms.get("foreign_weights", 0))
            pred = ms.get("predictor")
            if pred:
                c.predictor_updates = int(pred.get("updates", 0))
                if pred.get("recall_at_10pct") is not None:
                    c.predictor_recall = float(pred["recall_at_10pct"])
                    c.predictor_spearman = float(pred["spearman"])
        if step is not None and step.compactions:
            results = getattr(model_runner_output, plan_mod.RESULTS_ATTR, None) or {}
            for comp in step.compactions:
                st = self.kvs_state.get(comp.req_id)
                if st is None or st.pending is not comp:
                    continue
                ok = results.get(comp.req_id)
                if ok is True:
                    self._kvs_finish(comp, st)
                else:
                    self._kvs_fail(st, comp.req_id, ok, "compaction",
                                   "it continues uncompressed")
        if step is not None and step.tier_events:
            results = getattr(model_runner_output, plan_mod.RESULTS_ATTR, None) or {}
            for ev in step.tier_events:
                st = self.kvs_state.get(ev.req_id)
                if st is None or st.pending_tier is not ev:
                    continue
                res = results.get(ev.req_id)
                if isinstance(res, plan_mod.TierResult):
                    self._kvs_finish_tier(ev, st, res)
                else:
                    self._kvs_fail(st, ev.req_id, res, "tier event",
                                   "it continues on the blocks it holds")

    def _kvs_fail(self, st: _ReqState, req_id: str, result, what: str, then: str) -> None:
        """The worker reported a failure (or nothing): give back what the plan
        took, never compress the request again, count it."""
        self._kvs_release_pending(st, success=False)
        st.disabled = True
        self.kvs_counters.fallbacks += 1
        reason = result if isinstance(result, str) else "no result from worker"
        logger.warning("vllm-kvshrink: %s of request %s failed (%s); %s",
                       what, req_id, reason, then)

    def _kvs_finish_tier(self, ev: plan_mod.TierEvent, st: _ReqState,
                         res: plan_mod.TierResult) -> None:
        blocks = self._kvs_single.req_to_blocks[ev.req_id]
        before = len(blocks) + len(st.packed)
        held = list(blocks) + list(st.packed) + list(st.pending_fresh)
        by_id = {b.block_id: b for b in held}
        plain = [by_id[i] for i in res.plain_blocks]
        packed = [by_id[b] for b, _, _ in res.segments]
        used = {id(b) for b in plain + packed}
        spare = [b for b in held if id(b) not in used]
        blocks[:] = plain
        st.packed, st.segments = packed, list(res.segments)
        st.pending_tier, st.pending_fresh = None, []
        if spare:
            self._kvs_pool.free_blocks(reversed(spare))
        kept_plain = res.counts.get("bf16", 0)
        st.offset += ev.old_len - kept_plain
        st.compressed = True
        c = self.kvs_counters
        c.tier_events += 1
        c.tokens_demoted += round(res.demoted)
        c.tokens_evicted += round(res.evicted)
        c.blocks_freed += max(0, before - len(plain) - len(packed))

    def _kvs_finish(self, comp: plan_mod.Compaction, st: _ReqState) -> None:
        self.kvs_counters.cow_blocks += len(st.pending_cow)
        self._kvs_release_pending(st, success=True)
        st.offset += comp.old_len - comp.keep
        st.compressed = True
        blocks = self._kvs_single.req_to_blocks[comp.req_id]
        num_region = len(comp.block_ids)
        tail = blocks[num_region:]
        if tail:
            del blocks[num_region:]
            # Tail first, as vLLM frees: those are evicted first.
            self._kvs_pool.free_blocks(reversed(tail))
        c = self.kvs_counters
        c.compactions += 1
        c.tokens_evicted += comp.old_len - comp.keep
        c.blocks_freed += len(tail)

    # --------------------------------------------------------------- stats
    def _kvs_timed(self):
        """``with self._kvs_timed(): ...``: the block's seconds to the
        ``scheduler`` phase (:mod:`~vllm_kvshrink.serving.metrics.phases`) --
        the plugin's own bookkeeping, never vLLM's."""
        return phases.timed(self.kvs_counters.seconds, "scheduler")

    def kvs_bytes_held(self) -> dict[str, int]:
        """KV bytes the running compressed requests hold now, per form, plain
        tokens at the cache's element size."""
        held: dict[str, int] = {}
        for r in self.running:
            st = self.kvs_state.get(r.request_id)
            if st is not None and st.cfg.enabled:
                plain = r.num_computed_tokens - st.offset
                for form, n in self.kvs_tiers.bytes_actually_held(plain, st.segments).items():
                    held[form] = held.get(form, 0) + n
        return held

    def make_stats(self, *args: Any, **kwargs: Any):
        stats = super().make_stats(*args, **kwargs)
        if stats is None:
            return None
        with self._kvs_timed():
            payload = dict(stats.kv_connector_stats or {})
            payload[STATS_KEY] = self._kvs_counters_now().to_dict()
            stats.kv_connector_stats = payload
        return stats

    def _kvs_counters_now(self) -> Counters:
        """The counters with their gauges refreshed from the running requests."""
        c = self.kvs_counters
        c.logical_tokens = 0
        c.physical_tokens = 0
        for r in self.running:
            st = self.kvs_state.get(r.request_id)
            if st is not None and st.cfg.enabled:
                c.logical_tokens += r.num_computed_tokens
                c.physical_tokens += (r.num_computed_tokens - st.offset
                                      + sum(s[2] for s in st.segments))
        c.bytes_held = self.kvs_bytes_held()
        c.logical_bytes = c.logical_tokens * self.kvs_tiers.plain_token_bytes
        return c
