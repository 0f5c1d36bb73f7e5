"""Which storage forms the engine's packed pages can hold, by name, and the
page layout of each (:class:`~vllm_kvshrink.kernels.quant.PagedForm`, where
the format itself is defined: byte offsets, capacity, ``pack`` / ``unpack``).

Only token-axis forms (``*_tok``, and ``bf16``, the plain pages) can be
paged: a per-channel key group spans tokens, and a low-rank form's
(:mod:`.lowrank`) basis and mean are shared by a whole row.  A paged form's
capacity equals the form's :meth:`~.base.StorageForm.tokens_per_page`.
This is the scheduler's page arithmetic: it imports no Triton.
"""

from __future__ import annotations

from functools import lru_cache

from vllm_kvshrink.kernels.quant import PagedForm
from vllm_kvshrink.policy.nbytes import token_bytes
from vllm_kvshrink.storage import get_form
from vllm_kvshrink.storage.lowrank import LowRankForm
from vllm_kvshrink.storage.quantized import IntForm


def unpageable_reason(name: str) -> str | None:
    """Why form ``name`` cannot be held in the engine's packed pages (a
    phrase with the form as its subject), ``None`` if it can: ``bf16`` and
    the token-axis integer forms (every token's codes and parameters its
    own) can."""
    f = get_form(name)
    if name == "bf16" or (isinstance(f, IntForm) and f.key_axis == "token"):
        return None
    if isinstance(f, LowRankForm):
        return ("keeps keys on a per-row basis (a mean and a low-rank basis per "
                "(layer, KV head) shared by all its tokens)")
    if getattr(f, "key_axis", None) == "channel":
        return "keeps keys per channel in groups of tokens"
    return "is not a token-axis integer form"


def pageable(name: str) -> bool:
    """Whether form ``name`` can be held in the engine's packed pages."""
    return unpageable_reason(name) is None


@lru_cache(maxsize=64)
def paged_form(name: str, head_dim: int, block_size: int, elem_bytes: int) -> PagedForm:
    """The paged layout of form ``name`` (a ``*_tok`` form of
    :mod:`.quantized`) in pages of ``block_size`` tokens of ``elem_bytes``."""
    f = get_form(name)
    if getattr(f, "key_axis", None) != "token":
        why = ("a per-row basis and mean, shared by all its tokens"
               if isinstance(f, LowRankForm) else "per-channel groups")
        raise ValueError(
            f"storage form {name!r} cannot be held in the engine's packed blocks: "
            f"its keys share parameters across tokens ({why}); "
            f"allowed in the engine: bf16 and the token-axis forms (*_tok, *_tok_rot)")
    pf = PagedForm(name, f.bits, f.value_bits, f.rotate, head_dim,
                   block_size * token_bytes(1, head_dim, elem_bytes))
    if pf.capacity != f.tokens_per_page(head_dim, block_size, elem_bytes):
        raise AssertionError(f"{name}: page capacity disagrees with the form's bytes")
    if pf.capacity < 1:
        raise ValueError(f"a page of {pf.region_bytes} bytes holds no {name} token")
    return pf
