"""The observation window: where its queries sit in the cache, and the RoPE
frequencies a method may rotate them by.

Both paths keep the last ``obs_window`` queries with the logical position of
the token each belongs to; a method needs their index in the cache (cache
order, after evictions).  Queries belong to the newest tokens, which the
recent window never evicts (``obs_window <= recent_tokens``), and positions
stay logical as in vLLM, so a query's index is its distance back from the end.
"""

from __future__ import annotations

import torch


def query_index(num_cached: int, logical_len: int, positions) -> torch.Tensor:
    """``[m]`` int64 index in a cache of ``num_cached`` tokens (cache order,
    newest last) of the queries at logical ``positions`` ``[m]`` (a tensor or
    numpy array), the request having seen ``logical_len`` tokens.

    Raises ``RuntimeError`` if a query would fall outside the cache (its token
    was evicted: the recent window did not cover the observation window)."""
    pos = torch.as_tensor(positions, dtype=torch.int64)
    index = num_cached - (logical_len - pos)
    if (index < 0).any() or (index >= num_cached).any():
        raise RuntimeError("captured queries fall outside the cache")
    return index


def plain_rope_inv_freq(inv_freq: torch.Tensor | None, head_size: int, *,
                        rotate_half: bool = True, scaled: bool = False,
                        partial: bool = False) -> torch.Tensor | None:
    """The model's ``[R]`` RoPE frequencies (radians per position) if its RoPE
    is plain rotate-half RoPE (what ``expected_attention`` can average over
    future positions), else ``None``.

    Args:
        inv_freq: ``[R]`` the rotary module's frequencies, or ``None`` when the
            model has no recognisable rotary module.
        head_size: ``D``, the head dim the frequencies rotate (part of).
        rotate_half: whether the module rotates halves (GPT-NeoX / HF Llama
            layout); interleaved (GPT-J) layouts are refused.
        scaled: whether the module scales or reshapes the frequencies
            (YaRN, Llama-3, dynamic NTK, ...): refused.
        partial: whether RoPE over the first ``2R < D`` dims only is accepted
            (the research path accepts it; the engine requires ``2R == D``).

    Returns:
        float32 ``[R]`` on the CPU, or ``None``.
    """
    if inv_freq is None or scaled or not rotate_half:
        return None
    if 2 * inv_freq.shape[-1] != head_size and not partial:
        return None
    return inv_freq.detach().float().cpu()
