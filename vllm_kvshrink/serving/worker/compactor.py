"""Worker side of compaction: observation-window capture and token moves.

Owns no policy: the scheduler says which request keeps how many tokens
(:class:`~vllm_kvshrink.serving.plan.Compaction`); the method named in the plan scores
the cached keys; this module reads keys and queries, asks the method, and
moves the kept tokens to the front of the request's blocks in every layer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.kernels.layouts import stack_layers
from vllm_kvshrink.methods import Observation, build_method, compress_event, select_keep
from vllm_kvshrink.policy import record
from vllm_kvshrink.policy.heads import LOCAL, HeadGroup
from vllm_kvshrink.policy.observation import query_index
from vllm_kvshrink.serving import plan as plan_mod
from vllm_kvshrink.serving.metrics import phases
from vllm_kvshrink.serving.worker.kv_layout import (
    TokenLayout,
    move_tokens_stacked,
    probe_layout,
    read_row_stacked,
    row_slots,
    write_tokens_stacked,
)

logger = logging.getLogger("vllm.kvshrink")

#: Request slots the query ring starts with; it doubles up to max_num_seqs.
RING_START = 8


@dataclass
class _Req:
    slot: int  # row in the query ring buffers
    captured: int = 0  # queries written to the ring so far (all time)
    #: [L, H, K] logical position of each cached token up to ``kept``; only
    #: maintained when recording.
    logical: torch.Tensor | None = None
    kept: int = 0
    #: The method's per-request state between events (cache order).
    method_state: dict = field(default_factory=dict)
    #: Tiered storage: what the request holds in packed blocks
    #: (:class:`vllm_kvshrink.serving.worker.tiers.TierState`), None before its first event.
    tier: object = None
    #: Tiered storage: the distortion measured for its plans, between events
    #: (:func:`~vllm_kvshrink.storage.policy.form_distortion`)
    tier_memo: dict = field(default_factory=dict)


@dataclass
class CapturePlan:
    """One step's query rows to keep: row ``src[i]`` of the step's flattened
    queries goes to row ``dst[i]`` of every layer's ring."""

    src: torch.Tensor  # [n] token rows of the flattened batch
    dst: torch.Tensor  # [n] rows of the flattened ring buffer (slot * W + i)
    #: ``src`` is every row of the step in order (a decode step of tracked
    #: requests): the rows are copied as they are, without a gather
    whole: bool = False


@dataclass
class Compactor:
    config: KVShrinkConfig
    layer_names: list[str]
    caches: list[torch.Tensor]  # per layer [NB, H, bs, 2D]
    scales: list[float]
    num_q_heads: int
    head_size: int
    max_reqs: int
    write_fn: object  # probe writer
    layout: TokenLayout | None = None
    reqs: dict[str, _Req] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    results: dict[str, object] = field(default_factory=dict)
    pending: list = field(default_factory=list)  # this step's Compaction plans
    tier_pending: list = field(default_factory=list)  # this step's TierEvents
    #: the plain cache's layout for the packed-attention kernel (attention_layout)
    kernel_layout: object = None
    stats: dict[str, float] = field(default_factory=lambda: {"events": 0, "seconds": 0.0})
    #: Cumulative method statistics reported to the scheduler.
    method_stats: dict[str, float] = field(default_factory=lambda: {"merged_tokens": 0})
    #: Cumulative seconds per phase of this worker's work
    #: (:mod:`~vllm_kvshrink.serving.metrics.phases`), reported to the scheduler.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    _methods: dict = field(default_factory=dict)
    #: ``[D/2]`` RoPE frequencies of the model (plain rotate-half RoPE), or None
    rope_inv_freq: torch.Tensor | None = None
    #: the served model (path or hub id), for the learned weights' provenance
    model_name: str = ""
    _weights_logged: set = field(default_factory=set)
    #: times each live request was preempted (and so recomputed)
    epochs: dict = field(default_factory=dict)
    #: the KV heads an event's decisions span: this rank's and, under tensor
    #: parallelism, the other ranks' (:mod:`~vllm_kvshrink.policy.heads`)
    heads: HeadGroup = LOCAL

    def __post_init__(self) -> None:
        self.layer_index = {n: i for i, n in enumerate(self.layer_names)}
        w = self.config.obs_window
        self.ring_dtype = (self.caches[0].dtype if self.caches[0].is_floating_point()
                           else torch.float32)
        # One ring of the last W queries per request slot, per layer.  It lives
        # outside vLLM's KV pool, so it holds slots for the live requests only:
        # it starts small and doubles up to max_num_seqs (ring_bytes).
        self.capacity = min(self.max_reqs, RING_START)
        self.qbuf = torch.zeros(
            len(self.layer_names), self.capacity * w, self.num_q_heads, self.head_size,
            dtype=self.ring_dtype,
        )
        self.qviews = list(self.qbuf)  # each layer's ring, indexed once
        logger.info(
            "vllm-kvshrink: query ring of %d queries per request: %.2f MiB per "
            "request outside the KV pool, %.1f MiB at max_num_seqs=%d (it grows "
            "with the live requests)", w, self.ring_bytes(1) / 2**20,
            self.ring_bytes(self.max_reqs) / 2**20, self.max_reqs)
        self.ring_misses: set[str] = set()
        # All layers as one tensor when vLLM allocated them back to back (it
        # does): one gather / scatter per compaction instead of one per layer.
        stack = stack_layers(self.caches, contiguous=True)
        #: (stacked ``[L', NB, H, bs, 2D]`` view, its layers' slice of [L]) pairs:
        #: one for all layers when allocated back to back, else one per layer.
        self.stacks = ([(stack, slice(None))] if stack is not None else
                       [(c[None], slice(i, i + 1)) for i, c in enumerate(self.caches)])
        self.qpos = np.zeros((self.capacity, w), dtype=np.int64)  # logical positions
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self.block_size = self.caches[0].shape[2]
        self.num_kv_heads = self.caches[0].shape[1]

    # -------------------------------------------------------- request slots
    def ring_bytes(self, slots: int) -> int:
        """Bytes of the query ring (queries and their positions) for ``slots``
        requests."""
        w = self.config.obs_window
        per = (len(self.layer_names) * w * self.num_q_heads * self.head_size
               * self.ring_dtype.itemsize + w * 8)
        return slots * per

    def _grow(self) -> bool:
        if self.capacity >= self.max_reqs:
            return False
        w, old = self.config.obs_window, self.capacity
        new = min(self.max_reqs, 2 * old)
        qbuf = self.qbuf.new_zeros(self.qbuf.shape[0], new * w, *self.qbuf.shape[2:])
        qbuf[:, : old * w] = self.qbuf
        qpos = np.zeros((new, w), dtype=np.int64)
        qpos[:old] = self.qpos
        self.qbuf, self.qpos, self.capacity = qbuf, qpos, new
        self.qviews = list(qbuf)
        self.free_slots = list(range(new - 1, old - 1, -1)) + self.free_slots
        logger.info("vllm-kvshrink: query ring grown to %d requests (%.1f MiB)", new,
                    self.ring_bytes(new) / 2**20)
        return True

    def _req(self, req_id: str) -> _Req | None:
        r = self.reqs.get(req_id)
        if r is None:
            if not self.free_slots and not self._grow():
                # More live requests than max_num_seqs slots (vLLM runs at most
                # that many): this one gets no observation window, and an
                # attention-based compaction of it falls back.  Counted and
                # logged, never silent.
                self.method_stats["ring_misses"] = self.method_stats.get("ring_misses", 0) + 1
                if req_id not in self.ring_misses:
                    self.ring_misses.add(req_id)
                    logger.warning(
                        "vllm-kvshrink: no query-ring slot for request %s (%d "
                        "live, max_num_seqs=%d); its attention-scored "
                        "compactions fall back", req_id, len(self.reqs), self.max_reqs)
                return None
            r = _Req(slot=self.free_slots.pop())
            self.reqs[req_id] = r
        return r

    def drop(self, req_id: str) -> None:
        """Request finished or preempted: its ring slot is free again."""
        self.ring_misses.discard(req_id)
        r = self.reqs.pop(req_id, None)
        if r is not None:
            self.free_slots.append(r.slot)

    def reset(self, req_id: str) -> None:
        """Request restarts from scratch (new, or resumed after preemption)."""
        r = self.reqs.get(req_id)
        if r is not None:
            r.captured, r.logical, r.kept = 0, None, 0
            r.method_state = {}
            # Its packed blocks went back to the pool (the scheduler has them
            # zeroed, StepPlan.zero_blocks): forget them.
            r.tier = None
            r.tier_memo = {}

    # -------------------------------------------------------------- timing
    def add_seconds(self, phase: str, seconds: float) -> None:
        """Count ``seconds`` to ``phase`` (attention's sink, through the
        :class:`~vllm_kvshrink.serving.worker.step_context.StepContext`)."""
        phases.add(self.phase_seconds, phase, seconds)

    def timed(self, phase: str):
        """``with comp.timed("scoring"): ...``: the block's seconds to ``phase``."""
        return phases.timed(self.phase_seconds, phase)

    # ------------------------------------------------------------- capture
    def plan_capture(
        self,
        req_ids: list[str],
        num_computed: np.ndarray,
        num_scheduled: np.ndarray,
    ) -> CapturePlan | None:
        """Which query rows of this step go to which ring slots (``None``: no
        row); takes ring slots and advances each request's ring position, so
        it is called once per step, in batch order.  ``num_computed`` and
        ``num_scheduled``: ``[num_reqs]`` per request of the batch."""
        w = self.config.obs_window
        src, dst = [], []
        start = 0
        for i, req_id in enumerate(req_ids):
            n = int(num_scheduled[i])
            if n <= 0:
                continue
            r = self._req(req_id)
            if r is None:
                start += n
                continue
            m = min(n, w)
            first = start + n - m
            ring = (r.captured + np.arange(m)) % w
            src.append(np.arange(first, first + m))
            dst.append(r.slot * w + ring)
            self.qpos[r.slot, ring] = int(num_computed[i]) + n - m + np.arange(m)
            r.captured += m
            start += n
        if not src:
            return None
        rows = np.concatenate(src)
        return CapturePlan(torch.from_numpy(rows), torch.from_numpy(np.concatenate(dst)),
                           whole=len(rows) == start and bool((rows == np.arange(start)).all()))

    def capture_queries(self, cap: CapturePlan, layer_name: str,
                        query: torch.Tensor) -> None:
        """Copy the rows ``cap`` names of one layer's queries ``[T, Hq * D]``
        (the step's flattened batch) into that layer's ring; a layer outside
        the compacted group is ignored."""
        li = self.layer_index.get(layer_name)
        if li is None:
            return
        ring = self.qviews[li]
        q = query.reshape(query.shape[0], self.num_q_heads, self.head_size)
        if not cap.whole or q.shape[0] != cap.dst.shape[0]:
            q = q.index_select(0, cap.src)
        ring.index_copy_(0, cap.dst, q if q.dtype == ring.dtype else q.to(ring.dtype))

    def window(self, req_id: str) -> tuple[torch.Tensor, np.ndarray]:
        """Captured queries of every layer, oldest first: ``[L, Hq, m, D]`` and
        their logical positions ``[m]``."""
        r = self.reqs.get(req_id)
        if r is None:
            raise RuntimeError("no observation window for this request")
        w = self.config.obs_window
        m = min(r.captured, w)
        order = (r.captured - m + np.arange(m)) % w
        q = self.qbuf[:, torch.from_numpy(r.slot * w + order)]  # [L, m, Hq, D]
        return q.permute(0, 2, 1, 3), self.qpos[r.slot, order]

    # ---------------------------------------------------------- compaction
    def token_layout(self) -> TokenLayout:
        """Where each token's key and value bytes lie in a block, probed once
        through vLLM's own cache write (:func:`~vllm_kvshrink.serving.worker.kv_layout.
        probe_layout`)."""
        if self.layout is None:
            c = self.caches[0]
            read_dtype = torch.float8_e4m3fn if c.dtype == torch.uint8 else None
            self.layout = probe_layout(
                self.write_fn, self.num_kv_heads, self.block_size, self.head_size,
                c.dtype, read_dtype,
            )
        return self.layout

    def _keys_as_float(self, keys: torch.Tensor) -> torch.Tensor:
        if keys.dtype == torch.uint8:
            return keys.view(torch.float8_e4m3fn).to(torch.float32)
        return keys

    def read_row(self, blocks: list[int], n: int, half: str) -> torch.Tensor:
        """Keys (``half="keys"``) or values (``"values"``) of the first ``n``
        tokens of the block-table row ``blocks`` in every layer, a block at a
        time (:func:`~vllm_kvshrink.serving.worker.kv_layout.read_row_stacked`):
        ``[L, H, n, D]``, fp8 caches as float32."""
        layout = self.token_layout()
        return self._keys_as_float(torch.cat(
            [read_row_stacked(s, layout, blocks, n, half) for s, _ in self.stacks]))

    def method_for(self, comp: plan_mod.Compaction | plan_mod.TierEvent):
        """The scoring method a plan names (its method, pool kernel and
        arguments), built once and kept: stateful methods keep their
        per-request state in the request's slot, learned ones their weights."""
        key = (comp.method, comp.pool_kernel, json.dumps(comp.method_args, sort_keys=True))
        m = self._methods.get(key)
        if m is None:
            args = dict(comp.method_args)
            if args.get("predictor_save") and self.heads.rank > 0:
                # Under tensor parallelism each rank trains on its own heads:
                # rank 0 saves where asked, rank r beside it (never the same file).
                args["predictor_save"] = f"{args['predictor_save']}.tp{self.heads.rank}"
            cfg_like = KVShrinkConfig(method=comp.method, pool_kernel=comp.pool_kernel,
                                      method_args=args)
            m = self._methods[key] = build_method(cfg_like)
        return m

    def check_fault(self, req_id: str) -> None:
        fault, rank = self.config.inject_fault, self.config.inject_fault_rank
        if fault and req_id.startswith(fault) and rank in (-1, self.heads.rank):
            raise RuntimeError(f"fault injected (VLLM_KVSHRINK_INJECT_FAULT={fault!r}, "
                               f"tensor-parallel rank {self.heads.rank})")

    def queries_for(self, req_id: str, n: int, logical_len: int):
        """The observation window of a request holding ``n`` tokens in cache
        order: ``(queries [L, Hq, m, D], their index in the cache [m])``, the
        index by :func:`~vllm_kvshrink.policy.observation.query_index`."""
        q, pos = self.window(req_id)
        if q.shape[2] == 0:
            raise RuntimeError("no queries captured for this request")
        return q, query_index(n, logical_len, pos)

    def select(self, comp: plan_mod.Compaction, old_blocks: list[int]):
        """Score (and merge): ``(keep [L, H, K] ascending, merged keys, merged
        values or None)``.  Reads only; the method's state is updated."""
        self.check_fault(comp.req_id)
        method = self.method_for(comp)
        p, bs = comp.old_len, self.block_size
        layers, heads = len(self.caches), self.num_kv_heads
        if len(old_blocks) * bs < p:
            raise RuntimeError(
                f"block table holds {len(old_blocks) * bs} slots, plan says {p} tokens"
            )
        if method.position_only:
            # One selection by position serves every layer and head.
            scores = method.score(torch.empty(heads, p, 0))
            keep = select_keep(scores, comp.keep, comp.sink_tokens, comp.recent_tokens)
            return keep.expand(layers, heads, -1), None, None
        keys = self.read_row(old_blocks, p, "keys")  # [L, H, P, D]
        q = qpos = None
        if method.needs_queries:
            q, qpos = self.queries_for(comp.req_id, p, comp.logical_len)
        r = self._req(comp.req_id)
        state = r.method_state if r is not None else {}
        # Stateful methods update their state in place: work on a copy so a
        # failure below leaves the request's state as it was.
        work = dict(state) if method.stateful else state
        obs = Observation(keys, q, qpos, self.scales, rope_inv_freq=self.rope_inv_freq,
                          heads=self.heads)
        res = compress_event(method, obs, work, comp.keep, comp.sink_tokens,
                             comp.recent_tokens,
                             values=lambda: self.read_row(old_blocks, p, "values"))
        if r is not None and method.stateful:
            r.method_state = work
        if res.merged:
            # Per (layer, KV head) entries -> token equivalents.
            self.method_stats["merged_tokens"] += res.merged / (layers * heads)
        return res.keep, res.keys, res.values

    def apply(self, comp: plan_mod.Compaction, old_blocks: list[int]) -> list[int]:
        """Score, then move; returns the request's new block-table row (the
        kept region only: the scheduler frees the rest)."""
        t0 = time.perf_counter()
        with self.timed("scoring"):
            keep, new_keys, new_values = self.select(comp, old_blocks)
        bs = self.block_size
        if len(comp.block_ids) * bs < comp.keep:
            raise RuntimeError("new block region too small for the kept tokens")
        if keep.shape != (len(self.caches), self.num_kv_heads, comp.keep) or (
            comp.keep and int(keep.max()) >= comp.old_len
        ):
            raise RuntimeError("selection out of range")
        self.heads.agree()  # every rank has planned (or none writes)
        # Everything checked: now write.  Nothing above touched the cache.
        with self.timed("move"):
            self._move(comp, old_blocks, keep, new_keys, new_values)
        self._record(comp, keep)
        self.stats["events"] += 1
        self.stats["seconds"] += time.perf_counter() - t0
        return list(comp.block_ids)

    def _move(self, comp: plan_mod.Compaction, old_blocks: list[int], keep: torch.Tensor,
              new_keys: torch.Tensor | None, new_values: torch.Tensor | None) -> None:
        """Write the kept tokens (moved, or the merged ones) into the kept
        region, in every layer."""
        bs = self.block_size
        src_blocks, src_offsets = row_slots(old_blocks, keep, bs)  # [L, H, K] each
        dst_blocks, dst_offsets = row_slots(comp.block_ids, torch.arange(comp.keep), bs)
        layout = self.token_layout()
        for stack, layers in self.stacks:
            if new_keys is not None:
                # Merged content (computed from the old slots before any write).
                write_tokens_stacked(stack, layout, new_keys[layers], new_values[layers],
                                     dst_blocks, dst_offsets)
            else:
                move_tokens_stacked(stack, layout, src_blocks[layers], src_offsets[layers],
                                    dst_blocks, dst_offsets)

    def apply_tier(self, ev: plan_mod.TierEvent) -> plan_mod.TierResult:
        """Run one tier event (:func:`vllm_kvshrink.serving.worker.tiers.apply_event`)."""
        from vllm_kvshrink.serving.worker.tiers import apply_event

        t0 = time.perf_counter()
        r = self._req(ev.req_id)
        if r is None:
            raise RuntimeError("no worker slot for this request")
        res, r.tier, rec = apply_event(self, ev, r)
        if rec is not None:
            self._write_record({"req_id": ev.req_id, **rec})
        self.stats["events"] += 1
        self.stats["seconds"] += time.perf_counter() - t0
        return res

    def attention_layout(self):
        """The plain cache's layout as the packed-attention kernel takes it: a
        strided layout's name ("cpu_k_transposed" / "cpu_row_major"), or the
        probed index maps (:class:`~vllm_kvshrink.kernels.packed_batch.IndexMap`:
        any other in-block layout, e.g. vLLM's AMX tiles)."""
        if self.kernel_layout is None:
            from vllm_kvshrink.kernels.layouts import layout_from_kind
            from vllm_kvshrink.kernels.packed_batch import IndexMap

            tl = self.token_layout()
            if tl.kind == "generic":
                self.kernel_layout = IndexMap(tl.key_index.reshape(-1).to(torch.int32),
                                              tl.value_index.reshape(-1).to(torch.int32))
            else:
                self.kernel_layout = layout_from_kind(tl.kind)
        return self.kernel_layout

    def report_stats(self) -> dict:
        """Cumulative statistics of the methods in this worker,
        ``compaction_s``: seconds spent in compaction and tier events, and
        ``phase_seconds``: seconds per phase (:attr:`phase_seconds`)."""
        if self._methods:
            from vllm_kvshrink.methods.provenance import foreign_weights

            lines = foreign_weights(self.model_name)
            for line in lines:
                if line not in self._weights_logged:
                    self._weights_logged.add(line)
                    logger.warning("vllm-kvshrink: %s", line)
            self.method_stats["foreign_weights"] = len(lines)
        out = dict(self.method_stats)
        out["compaction_s"] = self.stats["seconds"]
        out["phase_seconds"] = dict(self.phase_seconds)
        for m in self._methods.values():
            pred = getattr(m, "predictor", None) or getattr(getattr(m, "inner", None),
                                                             "predictor", None)
            if pred is not None:
                out["predictor"] = pred.summary()
        return out

    # ------------------------------------------------------------ recording
    def _record(self, comp: plan_mod.Compaction, keep: torch.Tensor) -> None:
        if not self.config.record_dir:
            return
        r = self._req(comp.req_id)
        if r is None:
            return
        old_offset = comp.logical_len - comp.old_len
        tail = old_offset + torch.arange(r.kept, comp.old_len)
        layers = len(self.caches)
        tail = tail.expand(layers, self.num_kv_heads, -1)
        full = tail if r.logical is None else torch.cat([r.logical, tail], dim=-1)
        r.logical = full.gather(-1, keep)  # keep: [L, H, K]
        r.kept = comp.keep
        self._write_record({"req_id": comp.req_id, **record.eviction_record(
            comp.logical_len, comp.old_len, comp.keep, comp.method, r.logical.tolist())})

    def _write_record(self, rec: dict) -> None:
        """Append one line to this process's record file, tagged with the
        request's epoch (how many times it was restarted by preemption)."""
        if not self.config.record_dir:
            return
        rec["epoch"] = self.epochs.get(rec["req_id"], 0)
        if self.heads.size > 1:  # this rank's heads; the readers merge the ranks'
            rec.update(tp_rank=self.heads.rank, tp_size=self.heads.size)
        record.append_record(self.config.record_dir, rec)

    def restart(self, req_id: str, num_tokens: int) -> None:
        """A preempted request will be recomputed from scratch: a new epoch,
        whose first sampled token is at index ``num_tokens`` (recorded as a
        ``restart_at`` line for the replays)."""
        self.epochs[req_id] = self.epochs.get(req_id, 0) + 1
        self._write_record(record.restart_record(req_id, num_tokens))
        self.drop(req_id)
