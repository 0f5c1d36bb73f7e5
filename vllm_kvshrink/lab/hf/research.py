"""The research path: the same methods, applied to any transformers causal LM.

:class:`ResearchRunner` runs a model token by token (or chunk by chunk) with
its own KV store and calls :func:`~vllm_kvshrink.methods.compress_event` --
the function the engine's worker calls -- on the same schedule as the engine:
after a forward pass, once a request holds more than ``budget + slack``
tokens, it keeps ``ceil(budget / block_size) * block_size`` of them.  Keys are
stored after RoPE and positions stay logical, as in vLLM, so for the same
prompt the kept tokens agree with the engine's (see
``tests/engine/test_engine_research_agreement.py``).

What the engine cannot do, the research path can: per-head and per-layer
budgets (``head_budget``), the merged-slot attention-mass correction, MiniCache's
cross-layer merge, and access to the full attention for evaluation.

Attention runs through a custom transformers ``AttentionInterface`` entry that
reads the store, so it works for any model that routes attention through it
(Llama, Mistral, Qwen2/3, Gemma, ...).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.methods import Observation, build_method, compress_event
from vllm_kvshrink.policy import cadence, record
from vllm_kvshrink.policy.nbytes import token_bytes
from vllm_kvshrink.policy.observation import plain_rope_inv_freq, query_index

_IMPL = "kvshrink_research"
_ACTIVE: list["ResearchCache"] = []


@dataclass
class ResearchCache:
    """KV store of one sequence: per layer ``[Hkv, N, D]`` (physical order)."""

    num_layers: int
    obs_window: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    #: [L, Hkv, N] logical position of each stored token
    logical: torch.Tensor | None = None
    #: [L, Hkv, N] bool: hidden by a per-head budget (research only)
    hidden: torch.Tensor | None = None
    #: [L, Hkv, N] additive attention-logit bias (merged-slot mass), or None
    bias: torch.Tensor | None = None
    #: [L, Hkv, N] bool: K/V stored as norms only (MiniCache's second layer)
    shared: torch.Tensor | None = None
    #: last queries: list of (logical position, per-layer [Hq, D])
    qring: list = field(default_factory=list)
    _step_q: dict = field(default_factory=dict)
    #: optional observer of every layer's attention probabilities
    on_attention: Callable[[int, torch.Tensor], None] | None = None
    scales: list[float] = field(default_factory=list)
    #: per layer, the uniform storage form (one of vLLM's formats) every
    #: token is held in once :attr:`store_active`; ``None``: the model dtype
    store_forms: list | None = None
    store_active: bool = False
    #: tiered storage: the forms (:func:`~vllm_kvshrink.storage.policy.levels_for`)
    #: and ``[L, Hkv, N]`` int8 level of each stored token, or None
    levels: tuple = ()
    level: torch.Tensor | None = None
    #: tiered storage: the distortion measured for the plan, between events
    #: (:func:`~vllm_kvshrink.storage.policy.form_distortion`)
    tier_memo: dict = field(default_factory=dict)
    #: tiered storage with promotion: the offload copy
    #: (:class:`~vllm_kvshrink.lab.hf.offload.Offload`), or None
    offload: Any = None

    def __post_init__(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.scales = [0.0] * self.num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def kv_bytes(self) -> int:
        """Bytes the compressed cache holds, as vLLM would serve it (16-bit
        elements, whatever dtype this run computes in): visible tokens x K
        and V, MiniCache-shared tokens counted as two norms; tiered tokens
        and uniform storage forms at their forms' exact bytes."""
        if self.keys[0] is None:
            return 0
        hkv, n, d = self.keys[0].shape
        if self.level is not None:
            from vllm_kvshrink.storage.policy import held_bytes

            return held_bytes(self.level, self.levels, d)
        if self.store_forms is not None and self.store_active:
            return hkv * sum(f.nbytes(n, d) for f in self.store_forms)
        norms = token_bytes(1, 1)  # a shared token's K and V norms
        total = 0
        for layer in range(self.num_layers):
            vis = torch.ones(hkv, n, dtype=torch.bool)
            if self.hidden is not None:
                vis &= ~self.hidden[layer]
            full = vis
            if self.shared is not None:
                full = vis & ~self.shared[layer]
                total += int((vis & self.shared[layer]).sum()) * norms
            total += int(full.sum()) * token_bytes(1, d)
        return total


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               **kwargs):
    """query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]`` (this step's new
    tokens) -> ``[1, T, Hq, D]`` over the stored tokens plus the new ones."""
    cache = _ACTIVE[-1]
    li = module.layer_idx
    _, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    scaling = d**-0.5 if scaling is None else scaling
    cache.scales[li] = float(scaling)
    k_new, v_new = key[0], value[0]
    if cache.store_forms is not None and cache.store_active:
        k_new, v_new = cache.store_forms[li].roundtrip(k_new, v_new)
    if cache.keys[li] is None:
        cache.keys[li], cache.values[li] = k_new, v_new
    else:
        cache.keys[li] = torch.cat([cache.keys[li], k_new], dim=1)
        cache.values[li] = torch.cat([cache.values[li], v_new], dim=1)
    k, v = cache.keys[li], cache.values[li]
    n = k.shape[1]
    old = n - t
    # Keep this step's last queries for the observation window.
    cache._step_q[li] = query[0, :, -cache.obs_window:].detach()
    if old == 0 and cache.on_attention is None:
        # A first pass over a fresh cache: plain causal attention, nothing
        # hidden or biased, no probabilities wanted -- the fused kernel.
        out = torch.nn.functional.scaled_dot_product_attention(
            query[0].float(), k.float().repeat_interleave(g, 0),
            v.float().repeat_interleave(g, 0), is_causal=True, scale=scaling)
        return out.to(query.dtype).transpose(0, 1)[None].contiguous(), None
    logits = torch.einsum("hgtd,hnd->hgtn", query[0].view(hkv, g, t, d).float(),
                          k.float()) * scaling
    causal = torch.arange(n)[None, :] <= (old + torch.arange(t))[:, None]  # [T, N]
    mask = causal[None, None].expand(hkv, 1, t, n)
    if cache.hidden is not None and old:
        vis = torch.ones(hkv, n, dtype=torch.bool)
        vis[:, :old] = ~cache.hidden[li]
        mask = mask & vis[:, None, None, :]
    if cache.bias is not None and old:
        bias = torch.zeros(hkv, n)
        bias[:, :old] = cache.bias[li]
        logits = logits + bias[:, None, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cache.on_attention is not None:
        cache.on_attention(li, probs)
    out = torch.einsum("hgtn,hnd->hgtd", probs, v.float()).to(query.dtype)
    return out.reshape(hq, t, d).transpose(0, 1)[None].contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_IMPL, _attention)


@dataclass
class ResearchResult:
    token_ids: list[int]  # prompt + generated (or forced)
    events: list[dict]
    logits: torch.Tensor | None  # [steps, vocab] float32 of the fed positions
    kv_bytes: list[int]  # after every step
    full_kv_bytes: list[int]  # what the full cache would hold
    merged_tokens: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    #: the store as the run left it (keys, values, logical positions, ...)
    cache: ResearchCache | None = field(default=None, repr=False)
    #: bytes of the offload copy after every step (promotion only), apart
    #: from the resident ``kv_bytes``
    offload_bytes: list[int] = field(default_factory=list)


class ResearchRunner:
    """Runs a transformers causal LM under one compression config.

    Args:
        model: a transformers causal LM (any dtype; fp32 for exact checks).
        config: the plugin config (method, budget, sinks, ... and method_args;
            research-only arguments allowed).
        block_size: the engine's block size, which rounds the kept count.
        chunk: prompt tokens per forward pass (``None``: the whole prompt),
            mirroring the engine's ``max_num_batched_tokens``.
        store_form: one of vLLM's formats (e.g. ``"fp8"``, as its CPU backend
            stores it) every token is held in, from its write on
            (``store_from="write"``) or from the end of the prompt
            (``"prefill_end"``); bytes are counted in it.
    """

    def __init__(self, model, config: KVShrinkConfig, block_size: int = 16,
                 chunk: int | None = None,
                 store_form: str | None = None, store_from: str = "write") -> None:
        _register()
        if store_from not in ("write", "prefill_end"):
            raise ValueError(f"store_from={store_from!r}; allowed: write, prefill_end")
        if store_form is not None and config.tiered:
            raise ValueError("store_form (a uniform format) and tiered storage "
                             f"{config.storage} exclude each other")
        self.model = model
        self.cfg = config
        self.block_size = block_size
        self.chunk = chunk
        mc = model.config
        self.num_layers = mc.num_hidden_layers
        self.store_forms = None
        if store_form is not None:
            from vllm_kvshrink.storage import get_form

            form = get_form(store_form)
            # vLLM keeps some layers in the model dtype under a format
            # (TurboQuant: the first and last two of a dense model).
            skip = getattr(form, "skip_layers", lambda n: [])(self.num_layers)
            self.store_forms = [get_form("bf16") if i in skip else form
                                for i in range(self.num_layers)]
        self.store_from = store_from
        self.method = build_method(config) if config.enabled else None

    @torch.no_grad()
    def prefill(self, prompt_ids: list[int]) -> "Prefill":
        """The whole prompt in one forward pass with the full cache: a state
        every configuration of this model can continue from (see
        :meth:`run`'s ``prefill``)."""
        cache = ResearchCache(self.num_layers, self.cfg.obs_window)
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_IMPL)
        _ACTIVE.append(cache)
        try:
            pos = torch.arange(len(prompt_ids))
            out = self.model(input_ids=torch.tensor([list(prompt_ids)]),
                             position_ids=pos[None], use_cache=False)
            self._append(cache, pos)
        finally:
            _ACTIVE.pop()
            self.model.set_attn_implementation(previous)
        return Prefill(list(prompt_ids), cache, out.logits[:, -1:].detach())

    @torch.no_grad()
    def run(self, prompt_ids: list[int], max_new_tokens: int = 0,
            forced: list[int] | None = None, keep_logits: bool = False,
            on_attention=None, on_event=None, forced_chunk: int = 1,
            prefill: "Prefill | None" = None) -> ResearchResult:
        """Greedy generation (or teacher forcing with ``forced`` tokens, fed
        ``forced_chunk`` per forward pass; compression runs between passes).

        Row ``i`` of the returned logits predicts ``token_ids[i + 1]``
        (with ``prefill``, the prompt's rows are its last one only).

        ``prefill`` (from :meth:`prefill` on the same prompt): start from that
        state instead of running the prompt -- the same as running it in one
        chunk, since nothing is compressed before the prompt's pass ends.

        Returns the token ids, the compression events (same format as the
        engine's records), the logits of every fed position when
        ``keep_logits``, and the KV bytes held after every step.
        """
        cfg = self.cfg
        if prefill is not None:
            if list(prefill.prompt) != list(prompt_ids):
                raise ValueError("prefill was made for another prompt")
            cache = prefill.clone()
        else:
            cache = ResearchCache(self.num_layers, cfg.obs_window)
        cache.store_forms = self.store_forms
        cache.store_active = self.store_forms is not None and self.store_from == "write"
        if cfg.tiered and cfg.enabled:
            from vllm_kvshrink.storage.policy import levels_for

            if cfg.args.get("offload"):
                from vllm_kvshrink.lab.hf.offload import Offload

                cache.offload = Offload(cfg.args["offload"], cfg.args["promote_margin"])
            cache.levels = levels_for(cfg.storage)
            cache.level = None
            if cache.keys[0] is not None:  # a prefill: every token in bf16
                cache.level = torch.zeros(cache.logical.shape, dtype=torch.int8)
        cache.on_attention = on_attention
        state: dict = {}
        tokens = list(prompt_ids)
        events: list[dict] = []
        logits_out: list[torch.Tensor] = []
        kv_bytes: list[int] = []
        full_bytes: list[int] = []
        off_bytes: list[int] = []
        merged = 0
        logical = 0
        last_merge = 0
        pending = list(prompt_ids)
        generated = 0
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_IMPL)
        _ACTIVE.append(cache)
        resumed = prefill is not None
        try:
            while pending:
                step = pending
                if self.chunk and logical < len(prompt_ids):
                    step = pending[: self.chunk]
                if resumed:  # the prompt's pass: already run by prefill()
                    step, resumed = pending, False
                    pending = []
                    logical = len(step)
                    out = _Out(prefill.logits)
                else:
                    pending = pending[len(step):]
                    pos = torch.arange(logical, logical + len(step))
                    out = self.model(input_ids=torch.tensor([step]),
                                     position_ids=pos[None], use_cache=False)
                    self._append(cache, pos)
                    logical += len(step)
                if keep_logits:
                    logits_out.append(out.logits[0].float())
                if (self.store_forms is not None and not cache.store_active
                        and logical >= len(prompt_ids)):
                    self._store_all(cache)
                if self.method is not None:
                    if getattr(self.method, "cross_layer", False):
                        if cache.length - last_merge >= max(1, cfg.slack_tokens):
                            self._minicache(cache)
                            last_merge = cache.length
                    else:
                        ev = self._maybe_compress(cache, state, logical, len(prompt_ids))
                        if ev is not None:
                            merged += ev.pop("_merged", 0)
                            events.append(ev)
                            if on_event is not None:
                                on_event(ev, cache)
                kv_bytes.append(cache.kv_bytes())
                full_bytes.append(self._full_bytes(cache, logical))
                if cache.offload is not None:
                    off_bytes.append(cache.offload.nbytes())
                if pending:
                    continue
                if forced is not None:
                    fed = len(tokens) - len(prompt_ids)
                    pending = list(forced[fed: fed + forced_chunk])
                    tokens.extend(pending)
                elif generated < max_new_tokens:
                    nxt = int(out.logits[0, -1].argmax())
                    tokens.append(nxt)
                    generated += 1
                    if generated < max_new_tokens:
                        pending = [nxt]
        finally:
            _ACTIVE.pop()
            self.model.set_attn_implementation(previous)
        stats = {}
        pred = getattr(self.method, "predictor", None) or getattr(
            getattr(self.method, "inner", None), "predictor", None)
        if pred is not None:
            stats["predictor"] = pred.summary()
        if callable(getattr(self.method, "summary", None)):  # adaptive's choices
            stats[self.method.name] = self.method.summary()
        if cache.offload is not None:
            stats["offload"] = dict(cache.offload.stats)
        return ResearchResult(tokens, events,
                              torch.cat(logits_out) if keep_logits else None,
                              kv_bytes, full_bytes, merged, stats, cache, off_bytes)

    # ------------------------------------------------------------ internals
    def _token_bytes(self, cache: ResearchCache) -> int:
        """One token's K+V over every layer and KV head in 16 bits: what
        stock vLLM holds per token."""
        hkv, _, d = cache.keys[0].shape
        return token_bytes(self.num_layers * hkv, d)

    def _full_bytes(self, cache: ResearchCache, logical: int) -> int:
        return logical * self._token_bytes(cache)

    def _append(self, cache: ResearchCache, pos: torch.Tensor) -> None:
        l, hkv = self.num_layers, cache.keys[0].shape[0]
        t = pos.numel()
        new_logical = pos.expand(l, hkv, t)
        cache.logical = new_logical.clone() if cache.logical is None else torch.cat(
            [cache.logical, new_logical], dim=2)
        for name in ("hidden", "shared"):
            cur = getattr(cache, name)
            if cur is not None:
                setattr(cache, name, torch.cat([cur, torch.zeros(l, hkv, t,
                                                                 dtype=torch.bool)], 2))
        if cache.bias is not None:
            cache.bias = torch.cat([cache.bias, torch.zeros(l, hkv, t)], dim=2)
        if cache.levels:  # tiered: new tokens arrive in bf16
            cache.level = (torch.zeros(cache.logical.shape, dtype=torch.int8)
                           if cache.level is None else
                           torch.cat([cache.level, torch.zeros(l, hkv, t,
                                                               dtype=torch.int8)], 2))
        m = min(t, cache.obs_window)
        qs = torch.stack([cache._step_q[i][:, -m:] for i in range(l)])  # [L, Hq, m, D]
        for j in range(m):
            cache.qring.append((int(pos[t - m + j]), qs[:, :, j]))
        del cache.qring[: max(0, len(cache.qring) - cache.obs_window)]

    def _store_all(self, cache: ResearchCache) -> None:
        """Hold every cached token in the uniform form from now on (vLLM's
        formats, applied once the prompt has been seen in full precision)."""
        for layer in range(self.num_layers):
            cache.keys[layer], cache.values[layer] = self.store_forms[layer].roundtrip(
                cache.keys[layer], cache.values[layer])
        cache.store_active = True

    def _observation(self, cache: ResearchCache, logical: int,
                     keys: torch.Tensor | None = None) -> Observation:
        """The observation of an event over the stored keys, or over
        ``keys`` ``[L, H, P, D]`` (the promotion view: one index per logical
        position).  Either way the newest tokens end the key axis
        (:func:`~vllm_kvshrink.policy.observation.query_index`)."""
        keys = torch.stack(cache.keys) if keys is None else keys  # [L, H, N, D]
        q = qpos = None
        if self.method.needs_queries:
            q = torch.stack([qq for _, qq in cache.qring], dim=2)  # [L, Hq, m, D]
            pos = torch.tensor([p for p, _ in cache.qring])
            qpos = query_index(keys.shape[2], logical, pos)
        return Observation(keys, q, qpos, list(cache.scales),
                           rope_inv_freq=self._inv_freq(keys.shape[-1]))

    def _tier_record(self, cache: ResearchCache, logical: int, old_len: int, plan,
                     budget: int, **extra) -> dict:
        """The record of a tier event, as the engine writes it
        (:func:`~vllm_kvshrink.policy.record.tier_record`, after the cache was
        rewritten), plus ``extra`` fields."""
        rec = record.tier_record(logical, old_len, cache.logical.shape[-1], self.cfg.method,
                                 cache.logical.tolist(), cache.level.tolist(), cache.levels,
                                 plan.counts, plan.nbytes, budget)
        return {**rec, **extra, "_merged": 0}

    def _inv_freq(self, head_size: int) -> torch.Tensor | None:
        """The model's RoPE frequencies where it uses plain rotate-half RoPE
        (:func:`~vllm_kvshrink.policy.observation.plain_rope_inv_freq`; read by
        ``expected_attention`` to average future rotations).  transformers'
        ``rotary_emb`` rotates halves; RoPE over part of the head is accepted
        here, as before (the engine's rule refuses it)."""
        rot = getattr(getattr(self.model, "model", None), "rotary_emb", None)
        return plain_rope_inv_freq(getattr(rot, "inv_freq", None), head_size,
                                   scaled=getattr(rot, "rope_type", "default") != "default",
                                   partial=True)

    def _maybe_tier(self, cache: ResearchCache, state: dict, logical: int,
                    prompt_len: int) -> dict | None:
        from vllm_kvshrink.storage.policy import apply_tiers, tier_event

        cfg = self.cfg
        n = cache.length
        held = cache.kv_bytes()
        # Every (layer, head) holds the same number of bf16 tokens.
        loose = cadence.loose_bf16(cfg, int((cache.level[0, 0] == 0).sum()), n)
        budget = cadence.bytes_due(cfg, held, logical, prompt_len, self._token_bytes(cache),
                                   loose, self.chunk)
        if budget is None:
            return None
        if cache.offload is not None:
            from vllm_kvshrink.lab.hf.offload import promote_event

            return promote_event(self, cache, state, logical, budget)
        obs = self._observation(cache, logical)
        values = torch.stack(cache.values)
        plan = tier_event(self.method, obs, state, cache.levels, budget,
                          cfg.sink_tokens, cfg.recent_tokens, values,
                          cache.level, bf16_free="bf16" in cfg.storage,
                          memo=cache.tier_memo)
        keep = plan.keep()
        keys, vals = apply_tiers(plan, obs.keys, values, keep, cache.level)
        for layer in range(self.num_layers):
            cache.keys[layer], cache.values[layer] = keys[layer], vals[layer]
        cache.logical = cache.logical.gather(2, keep)
        cache.level = plan.level.gather(2, keep)
        return self._tier_record(cache, logical, n, plan, budget)

    def _maybe_compress(self, cache: ResearchCache, state: dict, logical: int,
                        prompt_len: int) -> dict | None:
        if self.cfg.tiered:
            return self._maybe_tier(cache, state, logical, prompt_len)
        cfg, bs = self.cfg, self.block_size
        physical = cache.length
        keep = cadence.tokens_to_keep(cfg, physical, logical, prompt_len, bs, self.chunk)
        if keep is None:
            return None
        obs = self._observation(cache, logical)
        keys = obs.keys
        res = compress_event(self.method, obs, state, keep, cfg.sink_tokens,
                             cfg.recent_tokens, values=lambda: torch.stack(cache.values),
                             hidden=cache.hidden,
                             budget_mode=cfg.args.get("head_budget", "uniform"))
        idx = res.keep[..., None].expand(-1, -1, -1, keys.shape[-1])
        for layer in range(self.num_layers):
            if res.keys is not None:
                dt = cache.keys[layer].dtype
                cache.keys[layer] = res.keys[layer].to(dt)
                cache.values[layer] = res.values[layer].to(dt)
            else:
                cache.keys[layer] = cache.keys[layer].gather(1, idx[layer])
                cache.values[layer] = cache.values[layer].gather(1, idx[layer])
        cache.logical = cache.logical.gather(2, res.keep)
        if res.visible is not None:
            cache.hidden = ~res.visible
        elif cache.hidden is not None:
            cache.hidden = cache.hidden.gather(2, res.keep)
        if self.cfg.args.get("mass_correction") and hasattr(self.method, "log_mass"):
            cache.bias = self.method.log_mass(state)
        return {**record.eviction_record(logical, physical, keep, self.cfg.method,
                                         cache.logical.tolist()), "_merged": res.merged}

    def _minicache(self, cache: ResearchCache) -> None:
        n = cache.length
        protect = torch.zeros(n, dtype=torch.bool)
        protect[: self.cfg.sink_tokens] = True
        protect[max(0, n - self.cfg.recent_tokens):] = True
        shared = self.method.apply(cache.keys, cache.values, protect)
        cache.shared = torch.stack(shared)


@dataclass
class Prefill:
    """A prompt's state after one full-cache forward pass (:meth:`ResearchRunner.prefill`)."""

    prompt: list[int]
    cache: ResearchCache
    logits: torch.Tensor  # [1, 1, vocab]: the prompt's last position

    def clone(self) -> ResearchCache:
        """A cache to continue from; this state stays as it is (K/V are
        copied: MiniCache writes into them)."""
        c = copy.copy(self.cache)
        c.keys = [k.clone() for k in c.keys]
        c.values = [v.clone() for v in c.values]
        c.qring, c._step_q, c.scales = list(c.qring), dict(c._step_q), list(c.scales)
        return c


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def kept_agreement(a: list[list[list[int]]], b: list[list[list[int]]]) -> float:
    """Share of kept (layer, head, position) entries two events have in common,
    over the larger of the two kept counts (events that kept different
    numbers of tokens, as tiered ones may, compare by overlap too)."""
    ta, tb = torch.tensor(a), torch.tensor(b)
    if ta.shape[:2] != tb.shape[:2]:
        return 0.0
    l, h = ta.shape[:2]
    k = max(ta.shape[2], tb.shape[2])
    hits = 0
    for i in range(l):
        for j in range(h):
            hits += len(set(ta[i, j].tolist()) & set(tb[i, j].tolist()))
    return hits / max(1, l * h * k)


def perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    lp = torch.log_softmax(logits.float(), dim=-1)
    nll = -lp[torch.arange(len(targets)), torch.tensor(targets)]
    return math.exp(float(nll.mean()))
