"""The model-runner seams: plans applied first, physical slots, logical RoPE.

Wrappers on vLLM's ``GPUModelRunner`` (which the CPU runner inherits):

* ``_update_states``: take this step's offsets and compaction plans;
* ``_prepare_inputs``: positions stay logical (RoPE sees the true position),
  while ``seq_lens`` and the slot mapping use the physical length
  (``logical - offset``); also builds the step's
  :class:`~vllm_kvshrink.serving.worker.step_context.StepContext` (which query rows
  to capture, the requests with packed blocks);
* ``_build_attention_metadata``: the step context rides on the attention
  metadata vLLM builds for the step, which is how attention gets it;
* ``execute_model``: after the forward pass, run the compactions (score, move
  the kept tokens, cut the block-table row; a failure moves nothing and is
  reported), then results ride back on the output (or ``sample_tokens``').
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import torch

from vllm_kvshrink import config as config_mod
from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.policy.heads import PeerFailed
from vllm_kvshrink.serving import plan as plan_mod
from vllm_kvshrink.serving.worker import step_context
from vllm_kvshrink.serving.worker.compactor import Compactor
from vllm_kvshrink.serving.worker.step_context import StepContext

logger = logging.getLogger("vllm.kvshrink")

_ORIG: dict[str, object] = {}


def _layer_of(runner, name):
    return runner.compilation_config.static_forward_context[name]


def _build_compactor(runner, cfg: KVShrinkConfig) -> Compactor:
    from vllm import _custom_ops as ops

    from vllm_kvshrink.serving import compat

    compat.check_attributes("model_runner", runner)
    group = runner.kv_cache_config.kv_cache_groups[0]
    names = list(group.layer_names)
    layers = [_layer_of(runner, n) for n in names]
    caches = []
    for layer in layers:
        kv = layer.kv_cache
        if isinstance(kv, (list, tuple)):
            kv = kv[0]
        caches.append(kv)
    first = layers[0]
    impl = first.impl
    isa = getattr(first, "isa", "vec")
    model_dtype = runner.model_config.dtype
    kv_dtype = impl.kv_cache_dtype

    def write(k, v, cache, slots):
        nb, h, bs, _ = cache.shape
        kc, vc = cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            k.to(model_dtype), v.to(model_dtype), kc, vc, slots, isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype=kv_dtype,
        )

    from vllm_kvshrink.serving.worker.tp_group import worker_heads

    return Compactor(
        heads=worker_heads(),
        rope_inv_freq=_rope_inv_freq(runner, impl.head_size),
        model_name=str(runner.model_config.model),
        config=cfg,
        layer_names=names,
        caches=caches,
        scales=[float(layer.impl.scale) for layer in layers],
        num_q_heads=impl.num_heads,
        head_size=impl.head_size,
        max_reqs=runner.scheduler_config.max_num_seqs,
        write_fn=write,
    )


def _rope_inv_freq(runner, head_size: int) -> torch.Tensor | None:
    """The model's RoPE frequencies when it uses plain rotate-half RoPE over
    the whole head (:func:`~vllm_kvshrink.policy.observation.plain_rope_inv_freq`);
    ``None`` for scaled or partial variants."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from vllm_kvshrink.policy.observation import plain_rope_inv_freq

    model = getattr(runner, "model", None)
    if model is None:
        return None
    for mod in model.modules():
        # vLLM's scaled variants are subclasses: only the plain class counts.
        if type(mod) is RotaryEmbedding:
            return plain_rope_inv_freq(mod._compute_inv_freq(mod.base), head_size,
                                       rotate_half=mod.is_neox_style)
    return None


def _compactor(runner) -> Compactor | None:
    comp = getattr(runner, "_kvs_compactor", None)
    if comp is None and getattr(runner, "kv_cache_config", None) is not None:
        comp = _build_compactor(runner, config_mod.current())
        runner._kvs_compactor = comp
    return comp


def _update_states(self, scheduler_output):
    comp = _compactor(self)
    if comp is None:
        return _ORIG["_update_states"](self, scheduler_output)
    for req_id in scheduler_output.finished_req_ids:
        comp.drop(req_id)
        comp.epochs.pop(req_id, None)
    for req_id in scheduler_output.preempted_req_ids or ():
        # Recomputed from scratch when resumed: its ring slot is free now.
        rs = self.requests.get(req_id)
        n = len(rs.prompt_token_ids or ()) + len(rs.output_token_ids) if rs else -1
        comp.restart(req_id, n)
    for new in scheduler_output.scheduled_new_reqs:
        comp.reset(new.req_id)
    for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
        comp.reset(req_id)
    step = getattr(scheduler_output, plan_mod.ATTR, None)
    comp.offsets = dict(step.offsets) if step is not None else {}
    comp.pending = list(step.compactions) if step is not None else []
    comp.tier_pending = list(step.tier_events) if step is not None else []
    if step is not None and step.zero_blocks:
        # Before this step's forward pass writes into them (see StepPlan).
        from vllm_kvshrink.serving.worker.tier_write import zero_blocks

        zero_blocks(comp, step.zero_blocks)
    return _ORIG["_update_states"](self, scheduler_output)


def _run_compactions(runner, comp: Compactor) -> None:
    """After the forward pass: move kept tokens, cut rows; report per request."""
    results: dict[str, object] = {}

    def attempt(req_id: str, what: str, fn) -> None:
        """Run one plan; a failure moves nothing, is logged and reported.
        Under tensor parallelism every rank runs the same plans in the same
        order and a failure on any rank, before anything is written, falls
        back on all (:mod:`~vllm_kvshrink.policy.heads`): the outcome rank 0
        reports is every rank's."""
        req_state = runner.requests.get(req_id)
        comp.heads.begin()
        try:
            if req_state is None:
                raise RuntimeError("request unknown to the worker")
            new_row, result = fn(list(req_state.block_ids[0]))
        except Exception as e:  # noqa: BLE001 - any failure falls back
            if not isinstance(e, PeerFailed):
                comp.heads.fail(f"{type(e).__name__}: {e}")
            if comp.config.strict:
                raise
            logger.warning("vllm-kvshrink: %s of %s failed: %r", what, req_id, e)
            results[req_id] = f"{type(e).__name__}: {e}"
            return
        _set_row(runner, req_id, new_row)
        results[req_id] = result

    def tier(ev, row):
        if row[: len(ev.plain_blocks)] != ev.plain_blocks:
            raise RuntimeError("the worker's block row differs from the plan's")
        res = comp.apply_tier(ev)
        return res.plain_blocks, res

    for c in comp.pending:
        attempt(c.req_id, "compaction", lambda row, c=c: (comp.apply(c, row), True))
    for ev in comp.tier_pending:
        attempt(ev.req_id, "tier event", lambda row, ev=ev: tier(ev, row))
    comp.tier_pending = []
    comp.pending = []
    comp.results.update(results)


def _set_row(runner, req_id, new_ids: list[int]) -> None:
    req_state = runner.requests.get(req_id)
    if req_state is None:
        return
    ids = req_state.block_ids[0]
    ids[:] = new_ids
    row = runner.input_batch.req_id_to_index.get(req_id)
    if row is not None:
        runner.input_batch.block_table.block_tables[0].add_row(list(ids), row)


def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
    comp = getattr(self, "_kvs_compactor", None)
    if comp is None:
        return _ORIG["_prepare_inputs"](self, scheduler_output, num_scheduled_tokens)
    num_reqs = self.input_batch.num_reqs
    req_ids = self.input_batch.req_ids[:num_reqs]
    num_computed = self.input_batch.num_computed_tokens_cpu[:num_reqs]
    capture = comp.plan_capture(req_ids, num_computed, num_scheduled_tokens)
    row_off = np.array([comp.offsets.get(r, 0) for r in req_ids], dtype=np.int64)
    block_table = self.input_batch.block_table
    if row_off.any():
        block_table._kvs_token_offsets = torch.from_numpy(
            np.repeat(row_off, num_scheduled_tokens[:num_reqs])
        )
    try:
        result = _ORIG["_prepare_inputs"](self, scheduler_output, num_scheduled_tokens)
    finally:
        block_table._kvs_token_offsets = None
    if row_off.any():
        off = torch.from_numpy(row_off)
        self.seq_lens[:num_reqs] -= off.to(self.seq_lens.device, self.seq_lens.dtype)
        self.optimistic_seq_lens_cpu[:num_reqs] -= off.to(self.optimistic_seq_lens_cpu.dtype)
    packed = None
    if any(r.tier is not None and r.tier.segments for r in comp.reqs.values()):
        from vllm_kvshrink.serving.worker.tiers import packed_batch

        with comp.timed("packed_batch"):
            packed, rows = packed_batch(
                comp, req_ids, num_computed, num_scheduled_tokens,
                lambda req_id: self.requests[req_id].block_ids[0])
        _attend_once(self, rows, num_scheduled_tokens)
    self._kvs_step = None
    if capture is not None or packed is not None:
        self._kvs_step = StepContext(
            capture=(functools.partial(comp.capture_queries, capture)
                     if capture is not None else None),
            packed=packed,
            packed_layout=comp.attention_layout() if packed is not None else None,
            timing=comp.add_seconds)
    return result


def _attend_once(runner, rows: list[int], num_scheduled) -> None:
    """Requests holding packed blocks (batch indices ``rows``) are attended by
    the plugin's kernel alone: vLLM's kernel is told their sequence ends with
    this step's query (``seq_len = q_len``), so its pass over them reads a few
    slots instead of the whole plain row, and the packed kernel overwrites
    its rows for them."""
    for i in rows:
        runner.seq_lens[i] = int(num_scheduled[i])


def _build_attention_metadata(self, *args, **kwargs):
    """vLLM's per-step attention metadata, carrying this step's context (or
    ``None`` outside a step: profiling and warm-up runs build metadata too)."""
    attn_metadata, spec_common = _ORIG["_build_attention_metadata"](self, *args, **kwargs)
    step_context.attach(attn_metadata, getattr(self, "_kvs_step", None))
    return attn_metadata, spec_common


def _compute_slot_mapping(self, num_reqs, query_start_loc, positions):
    off = getattr(self, "_kvs_token_offsets", None)
    if off is not None:
        positions = positions - off.to(positions.device, positions.dtype)
    return _ORIG["compute_slot_mapping"](self, num_reqs, query_start_loc, positions)


def _attach(runner, out):
    """The step's results and the worker's statistics ride on every output:
    the seconds per phase grow in steps without results too."""
    comp = getattr(runner, "_kvs_compactor", None)
    if comp is None or out is None:
        return out
    from vllm.v1.outputs import ModelRunnerOutput

    if not isinstance(out, ModelRunnerOutput):
        return out
    out = copy.copy(out)  # may be a shared constant (EMPTY_MODEL_RUNNER_OUTPUT)
    setattr(out, plan_mod.RESULTS_ATTR, comp.results)
    setattr(out, plan_mod.METHOD_STATS_ATTR, comp.report_stats())
    comp.results = {}
    return out


def _execute_model(self, scheduler_output, *args, **kwargs):
    try:
        out = _ORIG["execute_model"](self, scheduler_output, *args, **kwargs)
    finally:
        self._kvs_step = None
    comp = getattr(self, "_kvs_compactor", None)
    if comp is not None and (comp.pending or comp.tier_pending):
        # The forward pass has read and written the old layout; now it may move.
        with torch.inference_mode():
            _run_compactions(self, comp)
    return _attach(self, out)


def _sample_tokens(self, *args, **kwargs):
    return _attach(self, _ORIG["sample_tokens"](self, *args, **kwargs))


def install() -> None:
    """Patch the runner; the compactor reads the process's configuration
    (:func:`vllm_kvshrink.config.current`) when it is built."""
    from vllm.v1.worker.block_table import MultiGroupBlockTable
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _ORIG:
        return
    from vllm_kvshrink.serving import compat

    for name, new in (("_update_states", _update_states), ("_prepare_inputs", _prepare_inputs),
                      ("_build_attention_metadata", _build_attention_metadata),
                      ("execute_model", _execute_model), ("sample_tokens", _sample_tokens)):
        _ORIG[name] = compat.patch(GPUModelRunner, name, new)
    _ORIG["compute_slot_mapping"] = compat.patch(MultiGroupBlockTable, "compute_slot_mapping",
                                                 _compute_slot_mapping)
