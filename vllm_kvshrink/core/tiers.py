"""The scheduler's view of tiered requests: bytes and blocks, no tensors.

A tiered request holds a plain row (its ``req_to_blocks``, tokens in the model
dtype, what vLLM's own accounting sees) and packed blocks, each holding up to
a form's page capacity of tokens in every layer and KV head
(:mod:`vllm_kvshrink.storage.paged`).  Bytes are counted as the research
path counts them -- at 16 bits per bf16 element, exact codes and parameters
per form (:meth:`~vllm_kvshrink.storage.base.StorageForm.nbytes`) -- so both
paths compress at the same steps; blocks are counted at the cache's real
element size.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvshrink import schedule
from vllm_kvshrink.storage import FULL, get_form
from vllm_kvshrink.storage.paged import paged_form


#: ``kv_cache_dtype`` values whose pages are in a float model dtype, which
#: packed blocks reinterpret as bytes
PAGEABLE_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_cache_dtype(cfg, cache_dtype: str) -> None:
    """Tiered storage packs tokens into pages of the model dtype: refuse it
    with one of vLLM's quantized caches, naming both settings."""
    if cfg.tiered and cfg.enabled and cache_dtype not in PAGEABLE_CACHE_DTYPES:
        from vllm_kvshrink import envs

        where = cfg.source.get("storage", envs.PREFIX + "STORAGE")
        raise envs.KVShrinkConfigError(
            f"{where}={','.join(cfg.storage)!r} packs tokens into pages of the model "
            f"dtype, but kv_cache_dtype={cache_dtype!r}; allowed with tiered storage: "
            f"kv_cache_dtype='auto' (or storage 'bf16' with {cache_dtype!r})")


@dataclass(frozen=True)
class TierGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    elem_bytes: int

    @staticmethod
    def of(kv_cache_config, block_size: int) -> "TierGeometry":
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        dtype = spec.dtype
        return TierGeometry(len(group.layer_names), spec.num_kv_heads, spec.head_size,
                            block_size, dtype.itemsize)

    @property
    def rows(self) -> int:
        return self.num_layers * self.num_kv_heads

    @property
    def token_bytes(self) -> int:
        """One token's bf16 K+V over every layer and KV head."""
        return self.rows * get_form(FULL).nbytes(1, self.head_dim)

    def capacity(self, form: str) -> int:
        if form == FULL:
            return self.block_size
        return paged_form(form, self.head_dim, self.block_size, self.elem_bytes).capacity

    def held_bytes(self, plain: int, segments) -> int:
        return sum(self.bytes_by_form(plain, segments).values())

    def bytes_by_form(self, plain: int, segments) -> dict[str, int]:
        out = {FULL: self.rows * get_form(FULL).nbytes(plain, self.head_dim)}
        for _, form, n in segments:
            out[form] = out.get(form, 0) + n
        return {f: (v if f == FULL else self.rows * get_form(f).nbytes(v, self.head_dim))
                for f, v in out.items()}

    def due(self, cfg, plain: int, segments, logical: int, prompt_len: int) -> int | None:
        """The byte budget if the request is due for a tier event, else None
        (the research path's rule: :func:`vllm_kvshrink.schedule.bytes_due`)."""
        n = plain + sum(s[2] for s in segments)
        loose = max(0, plain - min(n, cfg.sink_tokens + cfg.recent_tokens))
        return schedule.bytes_due(cfg, self.held_bytes(plain, segments), logical,
                                  prompt_len, self.token_bytes, loose)

    def _forms(self, cfg) -> list[tuple[int, float]]:
        from vllm_kvshrink.storage.policy import levels_for

        return [(self.capacity(f), get_form(f).bytes_per_token(self.head_dim))
                for f in levels_for(cfg.storage)]

    def block_bound(self, cfg, budget: int) -> int:
        return schedule.tier_block_bound(budget, self._forms(cfg), self.rows)

    def peak_blocks(self, cfg, num_tokens: int, chunk_tokens: int) -> int:
        return schedule.tier_peak_blocks(cfg, num_tokens, self.block_size, chunk_tokens,
                                         self._forms(cfg), self.rows, self.token_bytes)
