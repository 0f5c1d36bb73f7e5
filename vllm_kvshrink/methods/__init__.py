"""Registry of compression methods, by the names ``VLLM_KVSHRINK_METHOD`` takes.

A name is one importance method (``snapkv``), or one followed by ``+semantic``
(``temporal+semantic``: the importance method chooses who stays, the semantic
merger folds the rest into them); ``semantic`` alone is ``snapkv+semantic``.
Method parameters come from ``VLLM_KVSHRINK_METHOD_ARGS`` (a JSON object) or a
request's ``method_args``; each is documented in :data:`PARAMS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from vllm_kvshrink.methods.base import (
    EventResult,
    Observation,
    ScoringMethod,
    compress_event,
    select_keep,
)
from vllm_kvshrink.methods.budgets import MODES as BUDGET_MODES


@dataclass(frozen=True)
class Param:
    kind: type
    default: Any
    doc: str
    check: Callable[[Any], bool] = lambda v: True
    allowed: str = ""
    research_only: bool = False  # the engine refuses a non-default value


def _unit(v):
    return 0.0 < v < 1.0


#: What ``adaptive_scorers`` may name: every importance method of the registry
#: but none / minicache / semantic / adaptive (checked against the registry).
ADAPTIVE_CANDIDATES = ("streaming", "h2o", "snapkv", "tova", "knorm", "ema", "temporal",
                       "expected_attention")


def adaptive_candidates() -> list[str]:
    from vllm_kvshrink.methods.adaptive import EXCLUDED

    return [n for n in _factories() if n not in EXCLUDED and n in ADAPTIVE_CANDIDATES]


def _adaptive_ok(v) -> bool:
    from vllm_kvshrink.methods.adaptive import parse_scorers

    try:
        parse_scorers(v, adaptive_candidates())
    except ValueError:
        return False
    return True


#: name -> Param.  Flat names, unique across methods.
PARAMS: dict[str, Param] = {
    "ema_decay": Param(float, 0.9, "ema: weight of the past per observed query", _unit,
                       "0 < x < 1"),
    "predictor_path": Param(str, "", "temporal: checkpoint to load ('' = the shipped "
                            "weights warmed up on the essays)"),
    "predictor_save": Param(str, "", "temporal: save the online-trained weights here "
                            "every 50 updates ('' = never)"),
    "online": Param(bool, True, "temporal / semantic: keep training during serving "
                    "(adaptive's temporal candidate: off unless given)"),
    "lr": Param(float, 1e-3, "temporal / semantic: AdamW learning rate",
                lambda v: 0 < v < 1, "0 < x < 1"),
    "train_rows": Param(int, 1024, "temporal: training rows sampled per event",
                        lambda v: v >= 1, "a whole number >= 1"),
    "merge_threshold": Param(float, 0.5, "semantic: least cosine similarity (learned "
                             "key embedding) at which an evicted token merges",
                             lambda v: -1 <= v <= 1, "-1 <= x <= 1"),
    "embed_path": Param(str, "", "semantic: key-embedding checkpoint ('' = shipped "
                        "or random orthogonal)"),
    "mass_correction": Param(bool, False, "semantic: add log(count) to merged slots' "
                             "attention logits (research path only)",
                             research_only=True),
    "minicache_start": Param(float, 0.5, "minicache: first merged layer, as a "
                             "fraction of depth", lambda v: 0 <= v < 1, "0 <= x < 1",
                             research_only=True),
    "minicache_retain_cos": Param(float, 0.0, "minicache: tokens whose two layers' "
                                  "directions have a lower cosine stay unmerged",
                                  lambda v: -1 <= v <= 1, "-1 <= x <= 1",
                                  research_only=True),
    "ea_cov": Param(bool, True, "expected_attention: add the query covariance term "
                    "0.5 * scale^2 * k'Sigma k (kvpress use_covariance)"),
    "ea_vnorm": Param(bool, True, "expected_attention: multiply by the value norm "
                      "||v|| (kvpress use_vnorm)"),
    "ea_epsilon": Param(float, 0.0, "expected_attention: added to the expected "
                        "attention before the value-norm product (kvpress epsilon)",
                        lambda v: v >= 0, "x >= 0"),
    "ea_future": Param(int, 512, "expected_attention: future positions the RoPE "
                       "rotation is averaged over (kvpress n_future_positions)",
                       lambda v: v >= 1, "a whole number >= 1"),
    "ea_sink": Param(int, 4, "expected_attention: first tokens left out of the query "
                     "statistics and the softmax, always kept (kvpress n_sink)",
                     lambda v: v >= 0, "a whole number >= 0"),
    "ea_rope_theta": Param(float, 0.0, "expected_attention: RoPE base of the model "
                           "(plain RoPE over the whole head), used when the caller gives "
                           "no RoPE frequencies (0 = none: window statistics without "
                           "future rotation)",
                           lambda v: v == 0 or v > 1, "0 or x > 1"),
    "offload": Param(float, 0.0, "tiered storage: keep the originals of up to this "
                     "fraction of the sequence's tokens (per layer and KV head) outside "
                     "the budget and promote the ones the scorer expects to matter "
                     "(research path only; 0 = demotion for good)",
                     lambda v: 0.0 <= v <= 1.0, "0 <= x <= 1", research_only=True),
    "adaptive_scorers": Param(str, "snapkv,expected_attention,ema", "adaptive: the "
                              "candidate scorers, comma-separated, in priority order "
                              "(ties go to the first)", lambda v: _adaptive_ok(v),
                              "distinct, comma-separated names of "
                              + ", ".join(ADAPTIVE_CANDIDATES)),
    "adaptive_decay": Param(float, 0.5, "adaptive: weight of the past in each "
                            "candidate's running held-out coverage", _unit, "0 < x < 1"),
    "adaptive_frac": Param(float, 0.25, "adaptive: share of the measured tokens the "
                           "held-out check counts as kept", _unit, "0 < x < 1"),
    "adaptive_sink": Param(int, 4, "adaptive: first tokens left out of the held-out "
                           "check (the event keeps them anyway)", lambda v: v >= 0,
                           "a whole number >= 0"),
    "promote_margin": Param(float, 1.0, "promotion: an evicted token's score is "
                            "divided by this before it competes with resident ones "
                            "(research path only; 1 = none)",
                            lambda v: v >= 1.0, "x >= 1", research_only=True),
    "head_budget": Param(str, "uniform", "per-head (adaptive, AdaKV) or per-layer "
                         "(pyramid, PyramidKV) budgets; the engine serves uniform only",
                         lambda v: v in BUDGET_MODES, " | ".join(BUDGET_MODES),
                         research_only=True),
}


@dataclass(frozen=True)
class MethodSpec:
    factory: Callable[[Any], Any] | None
    doc: str
    params: tuple[str, ...] = ()
    servable: bool = True


def _temporal(cfg):
    from vllm_kvshrink.methods.temporal import TemporalImportance, shared_predictor

    a = cfg.args
    return TemporalImportance(shared_predictor(a["predictor_path"], a["lr"]),
                              online=a["online"], train_rows=a["train_rows"],
                              save_path=a["predictor_save"])


def _expected_attention(cfg):
    from vllm_kvshrink.methods.expected_attention import ExpectedAttention

    a = cfg.args
    return ExpectedAttention(use_cov=a["ea_cov"], vnorm=a["ea_vnorm"],
                             epsilon=a["ea_epsilon"], n_future=a["ea_future"],
                             n_sink=a["ea_sink"], rope_theta=a["ea_rope_theta"])


_EA_PARAMS = ("ea_cov", "ea_vnorm", "ea_epsilon", "ea_future", "ea_sink", "ea_rope_theta")
_TEMPORAL_PARAMS = ("predictor_path", "predictor_save", "online", "lr", "train_rows")
#: adaptive's own arguments, then its candidates' (each applies only when its
#: candidate is listed in ``adaptive_scorers``).
_ADAPTIVE_PARAMS = ("adaptive_scorers", "adaptive_decay", "adaptive_frac",
                    "adaptive_sink", "ema_decay") + _TEMPORAL_PARAMS + _EA_PARAMS


def _adaptive(cfg):
    """The candidates built by the registry's own factories (their arguments
    and defaults apply); ``temporal`` offline unless ``online`` is given."""
    from types import SimpleNamespace

    from vllm_kvshrink.methods.adaptive import AdaptiveSelect, parse_scorers

    a = cfg.args
    given = getattr(cfg, "method_args", None) or {}
    names = parse_scorers(a["adaptive_scorers"], adaptive_candidates())
    factories = _factories()
    sub_cfg = SimpleNamespace(method=None, pool_kernel=cfg.pool_kernel,
                              args={**a, "online": bool(given.get("online", False))})
    cands = []
    for n in names:
        sub_cfg.method = n
        cands.append((n, factories[n].factory(sub_cfg)))
    return AdaptiveSelect(cands, decay=a["adaptive_decay"], frac=a["adaptive_frac"],
                          sink=a["adaptive_sink"])


def _factories() -> dict[str, MethodSpec]:
    from vllm_kvshrink.methods.ema import EMAAttention
    from vllm_kvshrink.methods.h2o import H2O
    from vllm_kvshrink.methods.knorm import KeyNorm
    from vllm_kvshrink.methods.minicache import MiniCache
    from vllm_kvshrink.methods.snapkv import SnapKV
    from vllm_kvshrink.methods.streaming import StreamingLLM
    from vllm_kvshrink.methods.tova import TOVA

    return {
        "none": MethodSpec(None, "no compression: stock vLLM behaviour"),
        "streaming": MethodSpec(lambda c: StreamingLLM(),
                                "StreamingLLM: attention sinks + most recent tokens "
                                "(arXiv:2309.17453)"),
        "h2o": MethodSpec(lambda c: H2O(), "H2O: accumulated attention of every observed "
                          "query (arXiv:2306.14048)"),
        "snapkv": MethodSpec(lambda c: SnapKV(pool_kernel=c.pool_kernel),
                             "SnapKV: observation-window attention, pooled, per KV head "
                             "(arXiv:2404.14469)"),
        "tova": MethodSpec(lambda c: TOVA(), "TOVA: attention of the newest query, mean "
                           "over the layer's heads (arXiv:2401.06104)"),
        "knorm": MethodSpec(lambda c: KeyNorm(), "Key-norm: keys with the smallest L2 "
                            "norm, per KV head (arXiv:2406.11430)"),
        "ema": MethodSpec(lambda c: EMAAttention(c.args["ema_decay"]),
                          "moving average of received attention (the temporal "
                          "predictor's simple twin)", ("ema_decay",)),
        "temporal": MethodSpec(_temporal, "TemporalImportancePredictor: small transformer "
                               "over each token's attention history, trained online",
                               ("predictor_path", "predictor_save", "online", "lr",
                                "train_rows")),
        "expected_attention": MethodSpec(
            _expected_attention, "Expected Attention: attention expected from a Gaussian "
            "of future queries (window mean + covariance, RoPE-averaged over future "
            "positions) times ||v||, per KV head (arXiv:2510.00636)", _EA_PARAMS),
        "minicache": MethodSpec(lambda c: MiniCache(c.args["minicache_start"],
                                                    c.args["minicache_retain_cos"]),
                                "MiniCache: merge adjacent deep layers' KV (research "
                                "path only; arXiv:2405.14366)",
                                ("minicache_start", "minicache_retain_cos"),
                                servable=False),
        "adaptive": MethodSpec(
            _adaptive, "per request and layer, the candidate scorer (adaptive_scorers) "
            "whose top tokens caught most of the held-out window queries' attention "
            "(running average); a selection among the scorers above", _ADAPTIVE_PARAMS),
    }


_SEMANTIC_PARAMS = ("merge_threshold", "embed_path", "online", "lr", "mass_correction")
_SEMANTIC_DOC = ("SemanticAwareCompressor: evicted tokens merged into similar kept "
                 "ones (learned key embedding); '<method>+semantic' composes it")


#: Not composable with ``+semantic``: no scorer, cross-layer merging, or
#: (adaptive) nested candidates whose ``online`` would clash with semantic's.
_NOT_COMPOSABLE = ("none", "minicache", "adaptive")


def base_names() -> list[str]:
    return list(_factories())


def available_methods() -> list[str]:
    """Every name ``VLLM_KVSHRINK_METHOD`` accepts (compositions included)."""
    names = base_names()
    importance = [n for n in names if n not in _NOT_COMPOSABLE]
    return names + ["semantic"] + [f"{n}+semantic" for n in importance]


def parse_method(name: str) -> tuple[str, bool]:
    """``(importance method, merges)`` of a method name; ``ValueError`` if unknown."""
    if name == "semantic":
        return "snapkv", True
    base, plus, tail = name.partition("+")
    if plus and tail != "semantic":
        raise ValueError(f"unknown composition {name!r}: only '<method>+semantic'")
    if base not in _factories() or (plus and base in _NOT_COMPOSABLE):
        raise ValueError(f"unknown method {name!r}")
    return base, bool(plus)


def method_params(name: str) -> tuple[str, ...]:
    base, merges = parse_method(name)
    own = _factories()[base].params + ("head_budget", "offload", "promote_margin")
    return tuple(dict.fromkeys(own + (_SEMANTIC_PARAMS if merges else ())))


def is_servable(name: str) -> bool:
    base, _ = parse_method(name)
    return _factories()[base].servable


def resolve_args(name: str, given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Defaults filled in, types and ranges checked; ``ValueError`` naming
    ``where`` (the setting), the key, the value and what is allowed."""
    allowed = method_params(name)
    out = {k: PARAMS[k].default for k in allowed}
    for key, value in (given or {}).items():
        if key not in PARAMS:
            raise ValueError(f"{where} has unknown key {key!r}; allowed keys for "
                             f"method {name!r}: {', '.join(allowed)}")
        if key not in allowed:
            raise ValueError(f"{where} key {key!r} does not apply to method {name!r}; "
                             f"allowed keys: {', '.join(allowed)}")
        p = PARAMS[key]
        if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, p.kind) or (p.kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{where}[{key!r}]={value!r} is not a {p.kind.__name__}; "
                             f"allowed: {p.allowed or p.kind.__name__}")
        if not p.check(value):
            raise ValueError(f"{where}[{key!r}]={value!r} is out of range; "
                             f"allowed: {p.allowed}")
        out[key] = value
    return out


def describe_methods() -> str:
    lines = []
    for name, spec in _factories().items():
        params = f"  [args: {', '.join(spec.params)}]" if spec.params else ""
        lines.append(f"{name:<10} {spec.doc}{params}")
    lines.append(f"{'semantic':<10} {_SEMANTIC_DOC}  [args: {', '.join(_SEMANTIC_PARAMS)}]")
    combos = [n for n in available_methods() if n.endswith("+semantic")]
    lines.append(f"{'':<10} compositions: {', '.join(combos)}")
    lines.append("\nMethod arguments (VLLM_KVSHRINK_METHOD_ARGS, JSON):")
    for key, p in PARAMS.items():
        lines.append(f"  {key:<22} default {p.default!r}: {p.doc}")
    return "\n".join(lines)


def build_method(cfg):
    """The method object named by ``cfg.method`` (``None`` for 'none').

    ``cfg`` needs ``method``, ``pool_kernel`` and ``args`` (resolved method
    arguments, see :func:`resolve_args`).
    """
    base, merges = parse_method(cfg.method)
    spec = _factories()[base]
    if spec.factory is None:
        return None
    method = spec.factory(cfg)
    if merges:
        from vllm_kvshrink.methods.semantic import SemanticMerge

        a = cfg.args
        method = SemanticMerge(method, threshold=a["merge_threshold"], online=a["online"],
                               embed_path=a["embed_path"], lr=a["lr"],
                               mass_correction=a["mass_correction"])
    return method


__all__ = [
    "EventResult",
    "Observation",
    "ScoringMethod",
    "compress_event",
    "select_keep",
    "available_methods",
    "base_names",
    "describe_methods",
    "build_method",
    "parse_method",
    "resolve_args",
    "is_servable",
    "PARAMS",
]
