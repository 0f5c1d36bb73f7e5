"""Replays the engine's evictions in transformers, with full masks.

The engine records, at each compaction, which logical positions every (layer,
KV head) kept.  A token computed after an event at logical length ``E`` saw
exactly ``kept_E`` plus every token from ``E`` up to itself -- and its hidden
states depend on nothing else.  So one transformers forward pass over the whole
sequence with a per-layer, per-head mask built from the events reproduces the
engine's logits at every position, without any KV cache.  Positions ids stay
logical, as the engine's RoPE does.  Records are read with
:func:`vllm_kvshrink.policy.record.load_events` (or ``load_epochs``).
"""

from __future__ import annotations

from typing import Iterable

import torch

from vllm_kvshrink.policy.record import by_logical_len

_IMPL = "kvshrink_replay"
_MASKS: dict[int, torch.Tensor] = {}  # layer -> [Hkv, T, T] bool (True: visible)


def build_masks(
    num_tokens: int, num_layers: int, num_kv_heads: int, events: Iterable[dict]
) -> list[torch.Tensor]:
    """Per layer ``[Hkv, T, T]`` visibility: causal, minus what was evicted."""
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    masks = [causal.expand(num_kv_heads, -1, -1).clone() for _ in range(num_layers)]
    events = by_logical_len(events)
    for i, e in enumerate(events):
        start = e["logical_len"]
        end = events[i + 1]["logical_len"] if i + 1 < len(events) else num_tokens
        if start >= num_tokens:
            break
        kept = torch.tensor(e["kept"], dtype=torch.long)  # [L, Hkv, K]
        for layer in range(num_layers):
            visible = torch.zeros(num_kv_heads, start, dtype=torch.bool)
            visible.scatter_(1, kept[layer], True)
            # Queries computed after this event (positions start..end-1) see
            # the kept tokens and everything from `start` on (causally).
            masks[layer][:, start:end, :start] = visible[:, None, :]
    return masks


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               **kwargs):
    """Eager attention with the replay mask of ``module.layer_idx``.

    query ``[B, Hq, T, D]``, key/value ``[B, Hkv, T, D]`` -> ``[B, T, Hq, D]``.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    scaling = d**-0.5 if scaling is None else scaling
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling
    mask = _MASKS[module.layer_idx].repeat_interleave(g, dim=0)[:, :t, :t]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_IMPL, _attention)


@torch.no_grad()
def replay_logits(model, token_ids: list[int], events: Iterable[dict], first: int = 0
                  ) -> torch.Tensor:
    """Logits of ``model`` over ``token_ids`` under the evictions, for the
    positions ``first`` to ``T - 1`` (``[T - first, vocab]``; the language
    model head runs on those positions only)."""
    _register()
    cfg = model.config
    t = len(token_ids)
    masks = build_masks(t, cfg.num_hidden_layers, cfg.num_key_value_heads, events)
    previous = model.config._attn_implementation
    _MASKS.clear()
    _MASKS.update(enumerate(masks))
    try:
        model.set_attn_implementation(_IMPL)
        ids = torch.tensor([token_ids])
        out = model(input_ids=ids, position_ids=torch.arange(t)[None], use_cache=False,
                    logits_to_keep=t - first)
        return out.logits[0].float()
    finally:
        model.set_attn_implementation(previous)
        _MASKS.clear()


def compare_greedy(
    logits: torch.Tensor, token_ids: list[int], prompt_len: int, tie_margin: float = 1e-4
) -> dict:
    """Check that each generated token is the replay's argmax.  ``logits``
    are the replay's rows for the last ``len(logits)`` positions of
    ``token_ids`` (all of them, or from ``prompt_len - 1`` on).

    Returns ``{"checked": n, "mismatch": index or None, "tie": bool, "gap":
    replay's top logit minus the engine token's}``; a
    mismatch where the replay's top-2 logits are within ``tie_margin`` is a
    numerical tie, after which the sequences may legitimately diverge.
    """
    offset = len(token_ids) - len(logits)
    assert 0 <= offset <= prompt_len - 1, (offset, prompt_len)
    checked = 0
    for pos in range(prompt_len, len(token_ids)):
        row = logits[pos - 1 - offset]
        pred = int(row.argmax())
        checked += 1
        if pred != token_ids[pos]:
            top = torch.topk(row, 2).values
            gap = float(top[0] - row[token_ids[pos]])
            return {"checked": checked, "mismatch": pos, "tie": gap < tie_margin, "gap": gap}
    return {"checked": checked, "mismatch": None, "tie": False, "gap": 0.0}
