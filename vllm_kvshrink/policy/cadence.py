"""When a request is compressed, and to what size: the one rule the engine's
scheduler and the research path both follow.

Eviction (storage ``bf16`` only): once a request holds more than its budget
plus ``slack_tokens`` tokens, it keeps its budget rounded up to whole blocks.

Tiered storage (storage names more than ``bf16``): the budget is a fraction
of the request's bf16 bytes at its logical length; once the bytes it holds
exceed that plus ``slack_tokens`` tokens' worth of bf16, the tier policy
(:mod:`vllm_kvshrink.storage.policy`) re-assigns forms to fit the budget.

Both wait for the end of a prompt while the rest of it fits in the budget, the
slack and one prefill chunk (:func:`waits_for_prompt`).

Tensors never appear here: counts and bytes only.
"""

from __future__ import annotations

import math


def _eligible(cfg, logical: int, prompt_len: int) -> bool:
    return max(logical, prompt_len) >= cfg.min_prompt_tokens


def waits_for_prompt(cfg, held: int, target: int, logical: int, prompt_len: int,
                     chunk_tokens: int | None, unit: int = 1) -> bool:
    """Whether a request still prefilling waits before it is compressed:
    while what it holds plus the rest of its prompt stays within its budget at
    the prompt's end plus the slack and one prefill chunk -- the most
    admission counts it may hold (:meth:`~vllm_kvshrink.config.KVShrinkConfig.
    peak_tokens`, :func:`tier_peak_blocks`) -- it is compressed only after
    the prompt's last token.

    ``held`` and ``target`` (the budget at ``prompt_len``) in tokens, or in
    bytes with ``unit`` the bytes of one bf16 token; ``chunk_tokens``: the
    engine's ``max_num_batched_tokens``, the research path's prompt tokens
    per pass (``None``: the whole prompt in one pass, never waits).

    Why: the engine's scheduler shares a step's token budget with decoding
    requests, so it often splits a prompt that would fit in one chunk (a
    piece of a few hundred tokens, then the rest).  Compressing after each
    piece costs an extra event, scores the first piece with its own last
    queries instead of the prompt's end (SnapKV's observation window), and
    prefills the rest through the packed attention kernel over the
    compressed cache.  A prompt longer than the budget plus a chunk is still
    compressed between pieces until the rest fits: that is what serves a
    prompt longer than the pool."""
    if chunk_tokens is None or logical >= prompt_len:
        return False
    return held + (prompt_len - logical) * unit <= target + (cfg.slack_tokens
                                                             + chunk_tokens) * unit


def tokens_to_keep(cfg, physical: int, logical: int, prompt_len: int,
                   block_size: int, chunk_tokens: int | None = None) -> int | None:
    """Tokens to keep if the request is due for compaction, else ``None``.

    ``physical``: tokens it holds; ``logical``: tokens it has seen;
    ``chunk_tokens``: see :func:`waits_for_prompt`."""
    if physical <= 0 or not _eligible(cfg, logical, prompt_len):
        return None
    if waits_for_prompt(cfg, physical, cfg.target_tokens(prompt_len), logical, prompt_len,
                        chunk_tokens):
        return None
    keep = min(physical, -(-cfg.target_tokens(logical) // block_size) * block_size)
    if physical <= keep + cfg.slack_tokens:
        return None
    return keep


def budget_bytes(cfg, logical: int, token_bytes: int) -> int:
    """Bytes a tiered request of ``logical`` tokens may hold; ``token_bytes``
    is one token's bf16 K+V over every layer and KV head.  Never below the
    sinks and the recent window in bf16 (as a token budget never goes below
    them)."""
    frac = float(cfg.budget)
    floor = min(logical, cfg.sink_tokens + cfg.recent_tokens) * token_bytes
    return max(math.floor(round(frac * logical * token_bytes, 6)), floor)


def bytes_due(cfg, held: int, logical: int, prompt_len: int, token_bytes: int,
              loose_bf16: int = 0, chunk_tokens: int | None = None) -> int | None:
    """The byte budget to compress to if a tiered request holding ``held``
    bytes is due, else ``None``.

    ``loose_bf16``: tokens held in bf16 outside the sinks and the recent
    window.  When the storage does not name ``bf16`` they are due for
    packing once there are more than ``slack_tokens`` of them, whatever the
    bytes (KIVI's full-precision residual: ``storage=int4`` at budget 1.0
    holds everything else in int4).  ``chunk_tokens``: see
    :func:`waits_for_prompt`."""
    if held <= 0 or not _eligible(cfg, logical, prompt_len):
        return None
    if waits_for_prompt(cfg, held, budget_bytes(cfg, prompt_len, token_bytes), logical,
                        prompt_len, chunk_tokens, token_bytes):
        return None
    budget = budget_bytes(cfg, logical, token_bytes)
    over = held > budget + cfg.slack_tokens * token_bytes
    unpacked = "bf16" not in cfg.storage and loose_bf16 > cfg.slack_tokens
    return budget if over or unpacked else None


def loose_bf16(cfg, plain: int, held: int) -> int:
    """Tokens held in bf16 outside the sinks and the recent window: what a
    tier event may demote (``loose_bf16`` of :func:`bytes_due`).

    ``plain``: tokens held in bf16; ``held``: tokens held in any form.

    Why ``plain - min(held, sinks + recent)``: after every tier event the
    sinks (the first ``sink_tokens`` held, in cache order) and the recent
    window (the last ``recent_tokens``) are in bf16 -- the tier policy refuses
    a plan that would demote them (:func:`~vllm_kvshrink.storage.policy.plan_tiers`)
    -- tokens appended since are bf16 too, and every (layer, KV head) holds
    the same number of tokens in each form.  So the bf16 tokens outside both
    regions are the bf16 count less the tokens the two regions cover, and
    counting them per (layer, head) in cache order gives the same number."""
    return max(0, plain - min(held, cfg.sink_tokens + cfg.recent_tokens))


def tier_block_bound(budget: int, forms: list[tuple[int, float]], rows: int) -> int:
    """Most blocks a tiered request holding at most ``budget`` bytes occupies:
    ``forms`` lists ``(tokens per block, bytes per token of one (layer, KV
    head))`` of each level it may use, ``rows`` = layers x KV heads.  Every
    level fills whole blocks but its last, so the bytes pay at the least dense
    level's rate, plus one partly filled block per level."""
    dense = min(cap * per for cap, per in forms)
    return int(budget // (rows * dense)) + len(forms)


def tier_peak_blocks(cfg, num_tokens: int, block_size: int, chunk_tokens: int,
                     forms: list[tuple[int, float]], rows: int, token_bytes: int) -> int:
    """Most blocks a tiered request of ``num_tokens`` holds at once: its byte
    budget's blocks (:func:`tier_block_bound`), plus the plain tokens it may
    gather before the next event (slack and one prefill chunk) in whole
    blocks; never more than it would hold uncompressed."""
    budget = budget_bytes(cfg, num_tokens, token_bytes)
    grow = -(-(cfg.slack_tokens + chunk_tokens) // block_size) + 1
    full = -(-num_tokens // block_size)
    return min(full, tier_block_bound(budget, forms, rows) + grow)
