"""Typed, validated configuration of the plugin.

``KVShrinkConfig.from_env()`` reads the ``VLLM_KVSHRINK_*`` variables (see
:mod:`vllm_kvshrink.envs`); ``with_overrides`` applies the per-request settings
given as ``SamplingParams(extra_args={"kvshrink": {...}})``.  Every bad value
fails with one message naming the setting, the value and what is allowed.

A serving process builds its configuration once: :func:`vllm_kvshrink.register`
(which vLLM runs in every process it starts) reads the environment, checks it
and hands it to :func:`set_current`; the scheduler and the worker read that
object through :func:`current`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from vllm_kvshrink import envs
from vllm_kvshrink.envs import KVShrinkConfigError

#: Key of the per-request settings inside ``SamplingParams.extra_args``.
EXTRA_ARGS_KEY = "kvshrink"

_CURRENT: KVShrinkConfig | None = None


def set_current(cfg: KVShrinkConfig) -> None:
    """Make ``cfg`` this process's configuration (:func:`vllm_kvshrink.register`
    calls it once, after the checks pass)."""
    global _CURRENT
    _CURRENT = cfg


def current() -> KVShrinkConfig:
    """This process's configuration, as :func:`vllm_kvshrink.register` built it."""
    if _CURRENT is None:
        raise RuntimeError(
            "vllm-kvshrink has no configuration in this process: "
            "vllm_kvshrink.register() has not run (vLLM runs it in every process it "
            "starts through the vllm.general_plugins entry point)")
    return _CURRENT


def request_overrides(extra_args: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Per-request settings from ``SamplingParams.extra_args``.

    Accepted forms: ``{"kvshrink": {"budget": 0.5}}`` (Python), the same dict as
    a JSON string, or flat keys ``{"kvshrink_budget": 0.5}`` -- the form the
    OpenAI server's ``vllm_xargs`` can carry (it allows scalars only).
    """
    if not extra_args:
        return None
    out: dict[str, Any] = {}
    nested = extra_args.get(EXTRA_ARGS_KEY)
    if isinstance(nested, str):
        import json

        try:
            nested = json.loads(nested)
        except ValueError:
            raise KVShrinkConfigError(
                f"extra_args[{EXTRA_ARGS_KEY!r}]={nested!r} is not valid JSON; "
                f"allowed: a dict of {', '.join(KVShrinkConfig.OVERRIDABLE)}"
            ) from None
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise KVShrinkConfigError(
                f"extra_args[{EXTRA_ARGS_KEY!r}]={nested!r} is not a dict; allowed "
                f"keys: {', '.join(KVShrinkConfig.OVERRIDABLE)}"
            )
        out.update(nested)
    prefix = EXTRA_ARGS_KEY + "_"
    for key, value in extra_args.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
    return out or None


@dataclass(frozen=True)
class KVShrinkConfig:
    method: str = "none"
    budget: float | int = 0.25
    sink_tokens: int = 4
    recent_tokens: int = 32
    slack_tokens: int = 32
    obs_window: int = 16
    pool_kernel: int = 7
    min_prompt_tokens: int = 0
    #: forms the tier policy may use (``("bf16",)``: eviction only); a
    #: comma-separated string is accepted and normalised
    storage: Any = ("bf16",)
    record_dir: str = ""
    strict: bool = False
    inject_fault: str = ""
    #: tensor-parallel rank the injected fault fires on (-1: every rank)
    inject_fault_rank: int = -1
    method_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: ``method_args`` with defaults filled in and checked (derived).
    args: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    #: Where a value came from, for error messages ("VLLM_KVSHRINK_BUDGET" or
    #: "extra_args['kvshrink']['budget']").
    source: Mapping[str, str] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        from vllm_kvshrink.methods import available_methods, resolve_args

        def where(field: str) -> str:
            return self.source.get(field, envs.PREFIX + field.upper())

        methods = available_methods()
        if self.method not in methods:
            raise KVShrinkConfigError(
                f"{where('method')}={self.method!r} is not a known method; "
                f"allowed: {', '.join(methods)}"
            )
        if not isinstance(self.method_args, Mapping):
            raise KVShrinkConfigError(
                f"{where('method_args')}={self.method_args!r} is not a dict of "
                f"method arguments"
            )
        try:
            args = resolve_args(self.method, self.method_args, where("method_args"))
        except ValueError as e:
            raise KVShrinkConfigError(str(e)) from None
        object.__setattr__(self, "args", args)
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise KVShrinkConfigError(
                f"{where('budget')}={b!r} is not a number; allowed: a fraction in "
                f"(0, 1] or a token count >= 1"
            )
        if isinstance(b, float):
            if not (math.isfinite(b) and 0.0 < b <= 1.0):
                raise KVShrinkConfigError(
                    f"{where('budget')}={b!r} is out of range; allowed: a "
                    f"fraction in (0, 1] (e.g. 0.25) or a whole token count >= 1"
                )
        elif b < 1:
            raise KVShrinkConfigError(
                f"{where('budget')}={b!r} is out of range; allowed: a whole "
                f"token count >= 1 or a fraction in (0, 1]"
            )
        from vllm_kvshrink.storage import parse_storage

        try:
            storage = parse_storage(self.storage, where("storage"))
        except ValueError as e:
            raise KVShrinkConfigError(str(e)) from None
        object.__setattr__(self, "storage", storage)
        if self.tiered:
            from vllm_kvshrink.methods import parse_method

            if not isinstance(b, float):
                raise KVShrinkConfigError(
                    f"{where('budget')}={b!r} is a token count, but "
                    f"{where('storage')}={','.join(storage)!r} holds tokens in "
                    f"several forms; allowed: a fraction in (0, 1] of the "
                    f"request's bf16 bytes (e.g. 0.25)")
            if self.enabled and (parse_method(self.method)[1]
                                 or self.method == "minicache"):
                raise KVShrinkConfigError(
                    f"{where('method')}={self.method!r} rewrites K/V (merging) and "
                    f"cannot be combined with {where('storage')}="
                    f"{','.join(storage)!r}; allowed with tiered storage: an "
                    f"importance method (e.g. snapkv, tova, h2o, ema, temporal)")
        if args.get("offload") and not self.tiered:
            raise KVShrinkConfigError(
                f"{where('method_args')}['offload']={args['offload']!r} promotes "
                f"demoted and evicted tokens from an offload copy, which needs "
                f"tiered storage; allowed: {where('storage')} naming a form besides "
                f"bf16 (e.g. 'bf16,int4_tok_rot,int2_tok_rot'), or offload 0")
        for name, low in (
            ("sink_tokens", 0),
            ("recent_tokens", 1),
            ("slack_tokens", 0),
            ("obs_window", 1),
            ("pool_kernel", 1),
            ("min_prompt_tokens", 0),
            ("inject_fault_rank", -1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KVShrinkConfigError(
                    f"{where(name)}={value!r} is out of range; allowed: a whole "
                    f"number >= {low}"
                )
        floor = self.sink_tokens + self.recent_tokens
        if isinstance(b, int) and b < floor:
            # "1" is a token count; a budget below the tokens that are always
            # kept would silently become that floor.
            raise KVShrinkConfigError(
                f"{where('budget')}={b!r} is a token count below the "
                f"{floor} tokens always kept ({where('sink_tokens')}="
                f"{self.sink_tokens} + {where('recent_tokens')}={self.recent_tokens})"
                f"; allowed: a whole token count >= {floor}, or a fraction in "
                f"(0, 1] written with a point (1.0 keeps everything, 0.25 a quarter)")
        if self.obs_window > self.recent_tokens:
            raise KVShrinkConfigError(
                f"{where('obs_window')}={self.obs_window} is larger than "
                f"{where('recent_tokens')}={self.recent_tokens}; allowed: "
                f"obs_window <= recent_tokens (the queries that score the cache "
                f"must belong to tokens that are never evicted)"
            )
        if self.pool_kernel % 2 == 0:
            raise KVShrinkConfigError(
                f"{where('pool_kernel')}={self.pool_kernel} is even; allowed: an "
                f"odd width >= 1"
            )

    # ------------------------------------------------------------------ build
    @classmethod
    def from_env(cls) -> "KVShrinkConfig":
        unknown = envs.unknown_variables()
        if unknown:
            known = ", ".join(sorted(envs.ENV_VARS))
            raise KVShrinkConfigError(
                f"unknown setting {unknown[0]} in the environment; allowed "
                f"variables: {known}"
            )
        return cls(
            method=envs.get("METHOD"),
            budget=envs.get("BUDGET"),
            sink_tokens=envs.get("SINK_TOKENS"),
            recent_tokens=envs.get("RECENT_TOKENS"),
            slack_tokens=envs.get("SLACK_TOKENS"),
            obs_window=envs.get("OBS_WINDOW"),
            pool_kernel=envs.get("POOL_KERNEL"),
            min_prompt_tokens=envs.get("MIN_PROMPT_TOKENS"),
            storage=envs.get("STORAGE"),
            record_dir=envs.get("RECORD_DIR"),
            strict=envs.get("STRICT"),
            inject_fault=envs.get("INJECT_FAULT"),
            inject_fault_rank=envs.get("INJECT_FAULT_RANK"),
            method_args=envs.get("METHOD_ARGS"),
        )

    #: Settings a single request may override.
    OVERRIDABLE = ("method", "budget", "sink_tokens", "recent_tokens", "slack_tokens",
                   "method_args", "storage")

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "KVShrinkConfig":
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise KVShrinkConfigError(
                f"extra_args[{EXTRA_ARGS_KEY!r}]={overrides!r} is not a dict; "
                f"allowed keys: {', '.join(self.OVERRIDABLE)}"
            )
        unknown = [k for k in overrides if k not in self.OVERRIDABLE]
        if unknown:
            raise KVShrinkConfigError(
                f"extra_args[{EXTRA_ARGS_KEY!r}] has unknown key {unknown[0]!r}; "
                f"allowed keys: {', '.join(self.OVERRIDABLE)}"
            )
        changes = dict(overrides)
        if "method" in changes and isinstance(changes["method"], str):
            changes["method"] = changes["method"].lower()
            if "method_args" not in changes and changes["method"] != self.method:
                # Arguments given for the global method do not follow a request
                # to another one; the request may pass its own method_args.
                from vllm_kvshrink.methods import method_params

                try:
                    allowed = method_params(changes["method"])
                except ValueError:
                    allowed = ()
                changes["method_args"] = {k: v for k, v in self.method_args.items()
                                          if k in allowed}
        source = dict(self.source)
        for k in changes:
            source[k] = f"extra_args[{EXTRA_ARGS_KEY!r}][{k!r}]"
        return dataclasses.replace(self, source=source, **changes)

    def check_servable(self) -> None:
        """Refuse what the engine cannot serve (research-path-only methods and
        arguments), naming the setting."""
        from vllm_kvshrink.methods import is_servable, param_table

        where = self.source.get("method", envs.PREFIX + "METHOD")
        if not is_servable(self.method):
            raise KVShrinkConfigError(
                f"{where}={self.method!r} runs in the research path only "
                f"(vllm_kvshrink.lab.hf.research): it merges KV across layers, and "
                f"vLLM's paged cache gives every layer its own blocks, so nothing "
                f"would be freed; allowed in the engine: any other method"
            )
        if self.tiered:
            from vllm_kvshrink.storage.paged import unpageable_reason

            ws = self.source.get("storage", envs.PREFIX + "STORAGE")
            # per-channel key groups span tokens; a low-rank form's basis and
            # mean span its whole row: neither fits a token's own bytes
            bad = [(n, why) for n in self.storage
                   if (why := unpageable_reason(n)) is not None]
            if bad:
                raise KVShrinkConfigError(
                    f"{ws}={','.join(self.storage)!r}: form {bad[0][0]!r} {bad[0][1]}, "
                    f"which the engine's packed blocks cannot hold (it runs in the "
                    f"research path, "
                    f"vllm_kvshrink.lab.hf.research); allowed in the engine: bf16 and the "
                    f"token-axis forms (int8_tok, int4_tok, int2_tok, k4v2_tok, each "
                    f"also with _rot)")
        wa = self.source.get("method_args", envs.PREFIX + "METHOD_ARGS")
        table = param_table()
        for key, value in self.args.items():
            p = table[key]
            if p.research_only and value != p.default:
                raise KVShrinkConfigError(
                    f"{wa}[{key!r}]={value!r} is supported in the research path only "
                    f"(the engine's layout: one block table and seq_len per request, "
                    f"no per-token attention bias); allowed in the engine: "
                    f"{p.default!r}"
                )

    # -------------------------------------------------------------- queries
    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def tiered(self) -> bool:
        """Whether tokens may be held in forms other than bf16."""
        return tuple(self.storage) != ("bf16",)

    def target_tokens(self, num_tokens: int) -> int:
        """Cache tokens a request of ``num_tokens`` logical tokens may keep."""
        if isinstance(self.budget, float):
            # round() first: 0.07 * 100 is 7.000000000000001 in binary floats.
            budget = math.ceil(round(self.budget * num_tokens, 9))
        else:
            budget = self.budget
        floor = self.sink_tokens + self.recent_tokens
        return min(num_tokens, max(budget, floor))

    def peak_tokens(self, num_tokens: int, block_size: int, chunk_tokens: int) -> int:
        """Most cache tokens a compressed request of ``num_tokens`` holds at
        once: its budget rounded up to whole blocks, the slack it may grow by,
        and one prefill chunk (plus a partly filled block) in flight."""
        keep = -(-self.target_tokens(num_tokens) // block_size) * block_size
        return min(num_tokens, keep + self.slack_tokens + chunk_tokens + block_size)
