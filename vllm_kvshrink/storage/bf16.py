"""``bf16``: the token as vLLM stores it, in the model's 16-bit dtype.

Bytes are counted at 2 per element whatever dtype a research run computes
in (the evaluation runs the model in fp32 for exact checks; the cache it
stands for is the 16-bit one vLLM serves), and the values are left untouched,
so a cache held entirely in this form is exactly the full cache.
"""

from __future__ import annotations

from vllm_kvshrink.policy.nbytes import token_bytes
from vllm_kvshrink.storage.base import StorageForm


class BF16(StorageForm):
    name = "bf16"
    doc = "the model's 16-bit dtype, as vLLM stores it (K and V, 2 bytes per element)"
    bits = 16
    token_local = True

    def nbytes(self, n_tokens: int, head_dim: int) -> int:
        return n_tokens * token_bytes(1, head_dim)

    def roundtrip(self, keys, values):
        return keys, values
