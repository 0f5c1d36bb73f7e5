"""Registry of storage forms, by the names ``VLLM_KVSHRINK_STORAGE`` takes.

Forms the tier policy may choose (:mod:`.quantized`, :mod:`.bf16`):

* ``bf16`` -- the model dtype, as vLLM stores it;
* ``int8``, ``int4``, ``int2`` -- asymmetric integer codes with a scale and a
  zero point; keys per channel over groups of tokens, values per token (KIVI);
* ``k4v2`` -- 4-bit keys, 2-bit values;
* ``<form>_tok`` -- keys per token as well;
* ``<form>_rot`` -- keys and values rotated per head by an orthonormal
  Hadamard matrix before quantization (spreads outlier channels).

Research-path-only forms (:mod:`.lowrank`; the engine's packed pages cannot
hold a per-row basis, the engine refuses them by name):

* ``lr8_int2``, ``lr16_int2``, ``lr8_int4`` -- keys as a per-(layer, KV
  head) mean and rank-``r`` SVD basis fitted to the tokens held, bf16
  coefficients per token and a ``bits``-bit per-token residual; values per
  token with the same bits.

vLLM 0.32's own uniform formats (:mod:`.vllm_formats`) are registered apart:
they are what users would pick instead, the evaluation's baselines, never a
tier.
"""

from __future__ import annotations

from functools import lru_cache

from vllm_kvshrink.storage.base import StorageForm

#: what the policy falls back to for sinks and the recent window
FULL = "bf16"


@lru_cache(maxsize=None)
def _ours() -> dict[str, StorageForm]:
    from vllm_kvshrink.storage.bf16 import BF16
    from vllm_kvshrink.storage.lowrank import LowRankForm
    from vllm_kvshrink.storage.quantized import IntForm

    forms: dict[str, StorageForm] = {"bf16": BF16()}
    for bits in (8, 4, 2):
        for key_axis in ("channel", "token"):
            for rotate in (False, True):
                f = IntForm(bits, key_axis, rotate)
                forms[f.name] = f
    for key_axis in ("channel", "token"):
        for rotate in (False, True):
            f = IntForm(4, key_axis, rotate, value_bits=2)
            forms[f.name] = f
    for rank, bits in ((8, 2), (16, 2), (8, 4)):
        f = LowRankForm(rank, bits)
        forms[f.name] = f
    return forms


@lru_cache(maxsize=None)
def _vllm() -> dict[str, StorageForm]:
    from vllm_kvshrink.storage.vllm_formats import FORMS

    return dict(FORMS)


def form_names() -> list[str]:
    """Every form the tier policy may use."""
    return list(_ours())


def baseline_names() -> list[str]:
    """vLLM's own formats the evaluation compares against."""
    return list(_vllm())


def get_form(name: str) -> StorageForm:
    if name in _ours():
        return _ours()[name]
    if name in _vllm():
        return _vllm()[name]
    raise ValueError(f"unknown storage form {name!r}; allowed: "
                     f"{', '.join(form_names() + baseline_names())}")


def parse_storage(value, where: str = "VLLM_KVSHRINK_STORAGE") -> tuple[str, ...]:
    """``"bf16,int4"`` (or a list) -> ``("bf16", "int4")``, checked: known
    forms of ours, no repeats, ordered from most to fewest bytes.
    ``ValueError`` naming ``where``, the value and what is allowed."""
    if isinstance(value, str):
        names = [s.strip() for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise ValueError(f"{where}={value!r} is not a comma-separated list of forms; "
                         f"allowed: {', '.join(form_names())}")
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"{where}={value!r} names no form; allowed: a comma-separated "
                         f"list of {', '.join(form_names())}")
    for n in names:
        if n not in _ours():
            hint = (" (a vLLM format: an evaluation baseline, set vLLM's "
                    "kv_cache_dtype for it)" if n in _vllm() else "")
            raise ValueError(f"{where}={value!r}: unknown form {n!r}{hint}; allowed: "
                             f"{', '.join(form_names())}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}={value!r} names a form twice")
    return tuple(sorted(names, key=lambda n: -_ours()[n].bytes_per_token(64)))


def describe_forms(head_dim: int | None = None, block_size: int | None = None,
                   rows: int | None = None) -> str:
    """One line per form; with ``head_dim`` its bytes per token and head (and
    per token over ``rows`` = layers x KV heads), tokens per page."""
    def line(name, f):
        s = f"  {name:<20} "
        if head_dim is not None and rows:
            s += f"{f.bytes_per_token(head_dim) * rows:>9,.0f} B/token, "
        return s + f.describe(head_dim, block_size)

    lines = ["Storage forms (VLLM_KVSHRINK_STORAGE, comma-separated):"]
    lines += [line(n, f) for n, f in _ours().items()]
    lines.append("vLLM 0.32's own KV formats (evaluation baselines, not tiers):")
    lines += [line(n, f) for n, f in _vllm().items()]
    return "\n".join(lines)


__all__ = ["StorageForm", "FULL", "form_names", "baseline_names", "get_form",
           "parse_storage", "describe_forms"]
