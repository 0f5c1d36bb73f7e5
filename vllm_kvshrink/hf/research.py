"""The research path: the same methods, applied to any transformers causal LM.

:class:`ResearchRunner` runs a model token by token (or chunk by chunk) with
its own KV store and calls :func:`~vllm_kvshrink.methods.compress_event` --
the function the engine's worker calls -- on the same schedule as the engine:
after a forward pass, once a request holds more than ``budget + slack``
tokens, it keeps ``ceil(budget / block_size) * block_size`` of them.  Keys are
stored after RoPE and positions stay logical, as in vLLM, so for the same
prompt the kept tokens agree with the engine's (see
``tests/test_engine_research_agreement.py``).

What the engine cannot do, the research path can: per-head and per-layer
budgets (``head_budget``), the merged-slot attention-mass correction, MiniCache's
cross-layer merge, and access to the full attention for evaluation.

Attention runs through a custom transformers ``AttentionInterface`` entry that
reads the store, so it works for any model that routes attention through it
(Llama, Mistral, Qwen2/3, Gemma, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.methods import Observation, build_method, compress_event
from vllm_kvshrink.methods.minicache import MiniCache

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
    #: store K/V rounded to this dtype (e.g. float8_e4m3fn: vLLM's
    #: ``kv_cache_dtype="fp8"`` with scale 1), or None
    store_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.scales = [0.0] * self.num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def kv_bytes(self) -> int:
        """Bytes the compressed cache holds: visible tokens x K and V, with
        MiniCache-shared tokens counted as two norms."""
        if self.keys[0] is None:
            return 0
        hkv, n, d = self.keys[0].shape
        elem = (torch.empty(0, dtype=self.store_dtype).element_size()
                if self.store_dtype is not None else self.keys[0].element_size())
        total = 0
        for layer in range(self.num_layers):
            vis = torch.ones(hkv, n, dtype=torch.bool)
            if self.hidden is not None:
                vis &= ~self.hidden[layer]
            full = vis
            if self.shared is not None:
                full = vis & ~self.shared[layer]
                total += int((vis & self.shared[layer]).sum()) * 2 * elem
            total += int(full.sum()) * 2 * d * elem
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
    if cache.store_dtype is not None:
        k_new = k_new.to(cache.store_dtype).to(key.dtype)
        v_new = v_new.to(cache.store_dtype).to(value.dtype)
    if cache.keys[li] is None:
        cache.keys[li], cache.values[li] = k_new, v_new
    else:
        cache.keys[li] = torch.cat([cache.keys[li], k_new], dim=1)
        cache.values[li] = torch.cat([cache.values[li], v_new], dim=1)
    k, v = cache.keys[li], cache.values[li]
    n = k.shape[1]
    old = n - t
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
    # Keep this step's last queries for the observation window.
    cache._step_q[li] = query[0, :, -cache.obs_window:].detach()
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


class ResearchRunner:
    """Runs a transformers causal LM under one compression config.

    Args:
        model: a transformers causal LM (any dtype; fp32 for exact checks).
        config: the plugin config (method, budget, sinks, ... and method_args;
            research-only arguments allowed).
        block_size: the engine's block size, which rounds the kept count.
        chunk: prompt tokens per forward pass (``None``: the whole prompt),
            mirroring the engine's ``max_num_batched_tokens``.
        kv_dtype: store K/V rounded to this dtype (``torch.float8_e4m3fn``
            emulates vLLM's ``kv_cache_dtype="fp8"``); bytes are counted in it.
    """

    def __init__(self, model, config: KVShrinkConfig, block_size: int = 16,
                 chunk: int | None = None, kv_dtype: torch.dtype | None = None) -> None:
        _register()
        self.kv_dtype = kv_dtype
        self.model = model
        self.cfg = config
        self.block_size = block_size
        self.chunk = chunk
        mc = model.config
        self.num_layers = mc.num_hidden_layers
        self.method = build_method(config) if config.enabled else None

    @torch.no_grad()
    def run(self, prompt_ids: list[int], max_new_tokens: int = 0,
            forced: list[int] | None = None, keep_logits: bool = False,
            on_attention=None, on_event=None, forced_chunk: int = 1) -> ResearchResult:
        """Greedy generation (or teacher forcing with ``forced`` tokens, fed
        ``forced_chunk`` per forward pass; compression runs between passes).

        Row ``i`` of the returned logits predicts ``token_ids[i + 1]``.

        Returns the token ids, the compression events (same format as the
        engine's records), the logits of every fed position when
        ``keep_logits``, and the KV bytes held after every step.
        """
        cfg = self.cfg
        cache = ResearchCache(self.num_layers, cfg.obs_window)
        cache.store_dtype = self.kv_dtype
        cache.on_attention = on_attention
        state: dict = {}
        tokens = list(prompt_ids)
        events: list[dict] = []
        logits_out: list[torch.Tensor] = []
        kv_bytes: list[int] = []
        full_bytes: list[int] = []
        merged = 0
        logical = 0
        last_merge = 0
        pending = list(prompt_ids)
        generated = 0
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_IMPL)
        _ACTIVE.append(cache)
        try:
            while pending:
                step = pending
                if self.chunk and logical < len(prompt_ids):
                    step = pending[: self.chunk]
                pending = pending[len(step):]
                pos = torch.arange(logical, logical + len(step))
                out = self.model(input_ids=torch.tensor([step]), position_ids=pos[None],
                                 use_cache=False)
                self._append(cache, pos)
                logical += len(step)
                if keep_logits:
                    logits_out.append(out.logits[0].float())
                if self.method is not None:
                    if isinstance(self.method, MiniCache):
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
        return ResearchResult(tokens, events,
                              torch.cat(logits_out) if keep_logits else None,
                              kv_bytes, full_bytes, merged, stats, cache)

    # ------------------------------------------------------------ internals
    def _full_bytes(self, cache: ResearchCache, logical: int) -> int:
        hkv, _, d = cache.keys[0].shape
        # The full cache in the model's dtype: what stock vLLM holds.
        return self.num_layers * hkv * logical * 2 * d * cache.keys[0].element_size()

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
        m = min(t, cache.obs_window)
        qs = torch.stack([cache._step_q[i][:, -m:] for i in range(l)])  # [L, Hq, m, D]
        for j in range(m):
            cache.qring.append((int(pos[t - m + j]), qs[:, :, j]))
        del cache.qring[: max(0, len(cache.qring) - cache.obs_window)]

    def _maybe_compress(self, cache: ResearchCache, state: dict, logical: int,
                        prompt_len: int) -> dict | None:
        cfg, bs = self.cfg, self.block_size
        physical = cache.length
        if max(logical, prompt_len) < cfg.min_prompt_tokens:
            return None
        target = cfg.target_tokens(logical)
        keep = min(physical, -(-target // bs) * bs)
        if physical <= keep + cfg.slack_tokens:
            return None
        keys = torch.stack(cache.keys)  # [L, H, N, D]
        q = qpos = None
        if self.method.needs_queries:
            q = torch.stack([qq for _, qq in cache.qring], dim=2)  # [L, Hq, m, D]
            pos = torch.tensor([p for p, _ in cache.qring])
            qpos = physical - (logical - pos)
        obs = Observation(keys, q, qpos, list(cache.scales))
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
        return {"logical_len": logical, "old_len": physical, "keep": keep,
                "method": self.cfg.method, "kept": cache.logical.tolist(),
                "_merged": res.merged}

    def _minicache(self, cache: ResearchCache) -> None:
        n = cache.length
        protect = torch.zeros(n, dtype=torch.bool)
        protect[: self.cfg.sink_tokens] = True
        protect[max(0, n - self.cfg.recent_tokens):] = True
        shared = self.method.apply(cache.keys, cache.values, protect)
        cache.shared = torch.stack(shared)


def kept_agreement(a: list[list[list[int]]], b: list[list[list[int]]]) -> float:
    """Share of kept (layer, head, position) entries two events have in common."""
    ta, tb = torch.tensor(a), torch.tensor(b)
    if ta.shape != tb.shape:
        return 0.0
    l, h, k = ta.shape
    hits = 0
    for i in range(l):
        for j in range(h):
            hits += len(set(ta[i, j].tolist()) & set(tb[i, j].tolist()))
    return hits / max(1, l * h * k)


def perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    lp = torch.log_softmax(logits.float(), dim=-1)
    nll = -lp[torch.arange(len(targets)), torch.tensor(targets)]
    return math.exp(float(nll.mean()))
