"""The scheduler's view of tiered requests: bytes and blocks by form, no tensors.

A tiered request holds a plain row (tokens in the model dtype, what vLLM's own
accounting sees) and packed blocks, each holding up to a form's page capacity
of tokens in every layer and KV head (:mod:`vllm_kvshrink.storage.paged`).
Bytes are counted as the research path counts them
(:mod:`vllm_kvshrink.policy.nbytes`), so both paths compress at the same
steps; blocks are counted at the cache's real element size.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvshrink.policy import cadence
from vllm_kvshrink.policy.nbytes import token_bytes
from vllm_kvshrink.storage import FULL, get_form
from vllm_kvshrink.storage.paged import paged_form


@dataclass(frozen=True)
class TierGeometry:
    """The cache's shape as the scheduler sees it: ``num_layers`` x
    ``num_kv_heads`` rows of ``head_dim`` elements, ``block_size`` tokens per
    block, ``elem_bytes`` per element of the model dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    elem_bytes: int

    @staticmethod
    def of(kv_cache_config, block_size: int, tensor_parallel_size: int = 1
           ) -> "TierGeometry":
        """From vLLM's ``KVCacheConfig`` (its one full-attention group), whose
        spec counts one tensor-parallel rank's KV heads: the scheduler counts
        every rank's, as the single-rank engine does (a block holds the same
        tokens on every rank), so budgets and events fall on the same steps."""
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        dtype = spec.dtype
        return TierGeometry(len(group.layer_names),
                            spec.num_kv_heads * tensor_parallel_size, spec.head_size,
                            block_size, dtype.itemsize)

    @property
    def rows(self) -> int:
        """(layer, KV head) pairs."""
        return self.num_layers * self.num_kv_heads

    @property
    def token_bytes(self) -> int:
        """One token's bf16 K+V over every layer and KV head."""
        return token_bytes(self.rows, self.head_dim)

    def capacity(self, form: str) -> int:
        """Tokens one block holds in ``form``."""
        if form == FULL:
            return self.block_size
        return paged_form(form, self.head_dim, self.block_size, self.elem_bytes).capacity

    @property
    def plain_token_bytes(self) -> int:
        """One token's K+V over every layer and KV head at the cache's own
        element size: what a plain token really holds (a float32 cache's is
        twice :attr:`token_bytes`)."""
        return token_bytes(self.rows, self.head_dim, self.elem_bytes)

    def bytes_actually_held(self, plain: int, segments) -> dict[str, int]:
        """Bytes per form that ``plain`` tokens at the cache's element size
        and the packed ``segments`` hold: what the ``bytes_held`` gauge
        reports.  Budgets use :meth:`held_bytes` (bf16 bytes) instead, so a
        float32 model compresses at the same steps as the research path."""
        return {**self.bytes_by_form(plain, segments), FULL: plain * self.plain_token_bytes}

    def held_bytes(self, plain: int, segments) -> int:
        """Bytes held by ``plain`` bf16 tokens and the packed ``segments``
        (``(block_id, form, n)``)."""
        return sum(self.bytes_by_form(plain, segments).values())

    def bytes_by_form(self, plain: int, segments) -> dict[str, int]:
        """:meth:`held_bytes` per form."""
        out = {FULL: self.rows * get_form(FULL).nbytes(plain, self.head_dim)}
        for _, form, n in segments:
            out[form] = out.get(form, 0) + n
        return {f: (v if f == FULL else self.rows * get_form(f).nbytes(v, self.head_dim))
                for f, v in out.items()}

    def due(self, cfg, plain: int, segments, logical: int, prompt_len: int,
            chunk_tokens: int | None = None) -> int | None:
        """The byte budget if the request is due for a tier event, else None
        (the research path's rule: :func:`~vllm_kvshrink.policy.cadence.bytes_due`
        with :func:`~vllm_kvshrink.policy.cadence.loose_bf16`)."""
        n = plain + sum(s[2] for s in segments)
        return cadence.bytes_due(cfg, self.held_bytes(plain, segments), logical,
                                 prompt_len, self.token_bytes,
                                 cadence.loose_bf16(cfg, plain, n), chunk_tokens)

    def _forms(self, cfg) -> list[tuple[int, float]]:
        from vllm_kvshrink.storage.policy import levels_for

        return [(self.capacity(f), get_form(f).bytes_per_token(self.head_dim))
                for f in levels_for(cfg.storage)]

    def block_bound(self, cfg, budget: int) -> int:
        """Most blocks a request holding at most ``budget`` bytes occupies
        (:func:`~vllm_kvshrink.policy.cadence.tier_block_bound`)."""
        return cadence.tier_block_bound(budget, self._forms(cfg), self.rows)

    def peak_blocks(self, cfg, num_tokens: int, chunk_tokens: int) -> int:
        """Most blocks a tiered request of ``num_tokens`` holds at once
        (:func:`~vllm_kvshrink.policy.cadence.tier_peak_blocks`)."""
        return cadence.tier_peak_blocks(cfg, num_tokens, self.block_size, chunk_tokens,
                                        self._forms(cfg), self.rows, self.token_bytes)
