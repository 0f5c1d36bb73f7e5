"""Bytes and blocks: per token, and a request's peak in blocks.

Bytes are counted as vLLM holds a bf16 cache -- K and V, 2 bytes per element,
whatever dtype a research run computes in -- and packed forms at their exact
bytes (:meth:`~vllm_kvshrink.storage.base.StorageForm.nbytes`), so the engine
and the research path compress at the same steps.  Blocks are counted at the
cache's real element size.  No tensors: counts only.
"""

from __future__ import annotations

#: bytes of one K or V element in the 16-bit cache vLLM serves
BF16_BYTES = 2


def token_bytes(rows: int, head_dim: int, elem_bytes: int = BF16_BYTES) -> int:
    """One token's K + V over ``rows`` (layer, KV head) pairs of ``head_dim``
    elements each, at ``elem_bytes`` per element (default: the 16-bit cache).

    ``rows=1`` is one (layer, KV head)'s share; ``rows = layers x KV heads``
    is what one cached token costs the whole model."""
    return rows * 2 * head_dim * elem_bytes


def request_peak_blocks(cfg, num_tokens: int, block_size: int, chunk_tokens: int,
                        geometry=None) -> int:
    """Most KV blocks a compressed request of ``num_tokens`` tokens holds at
    once: with tiered storage its byte budget's blocks by form
    (:meth:`~vllm_kvshrink.storage.geometry.TierGeometry.peak_blocks`;
    ``geometry`` is then required), else
    its token peak (:meth:`~vllm_kvshrink.config.KVShrinkConfig.peak_tokens`)
    in whole blocks of ``block_size``.  The front end's admission check and
    the scheduler's block reservation both use it."""
    if cfg.tiered:
        if geometry is None:
            raise ValueError("a tiered request's peak needs the cache geometry")
        return geometry.peak_blocks(cfg, num_tokens, chunk_tokens)
    return -(-cfg.peak_tokens(num_tokens, block_size, chunk_tokens) // block_size)
