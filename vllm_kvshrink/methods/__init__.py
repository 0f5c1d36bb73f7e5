"""Registry of compression methods, by the names ``VLLM_KVSHRINK_METHOD`` takes.

A name is one importance method (``snapkv``), or one followed by ``+semantic``
(``temporal+semantic``: the importance method chooses who stays, the semantic
merger folds the rest into them); ``semantic`` alone is ``snapkv+semantic``.
Method parameters come from ``VLLM_KVSHRINK_METHOD_ARGS`` (a JSON object) or a
request's ``method_args``.  Each method module declares its own in a
module-level ``PARAMS`` (see :mod:`vllm_kvshrink.methods.params`); the
framework's (``head_budget`` with the head budgets, promotion's ``offload``
and ``promote_margin`` in :mod:`~vllm_kvshrink.methods.params`), and :func:`param_table` gathers all of them into
the one flat table the config validates against.

Adding a method is one file plus one registry line: write its module (the
method class, its ``PARAMS``, and a ``build(cfg)`` when the constructor needs
more than a lambda over ``cfg.args``), then add its :class:`MethodSpec` to
:func:`_registry`.  The parameters, their checks and ``--list``'s
documentation follow from the declaration.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from vllm_kvshrink.methods.base import (
    EventResult,
    Observation,
    ScoringMethod,
    compress_event,
    select_keep,
)
from vllm_kvshrink.methods.params import Param, gather


@dataclass(frozen=True)
class MethodSpec:
    factory: Callable[[Any], Any] | None
    doc: str
    #: the method's own parameters: its module's ``PARAMS``
    params: Mapping[str, Param] = field(default_factory=dict)
    servable: bool = True
    #: methods whose parameters also apply (adaptive's candidates)
    nested: tuple[str, ...] = ()


@functools.cache
def _registry() -> dict[str, MethodSpec]:
    from vllm_kvshrink.methods import (
        adaptive,
        ema,
        expected_attention,
        minicache,
        temporal,
    )
    from vllm_kvshrink.methods.h2o import H2O
    from vllm_kvshrink.methods.knorm import KeyNorm
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
        "ema": MethodSpec(lambda c: ema.EMAAttention(c.args["ema_decay"]),
                          "moving average of received attention (the temporal "
                          "predictor's simple twin)", ema.PARAMS),
        "temporal": MethodSpec(temporal.build, "TemporalImportancePredictor: small "
                               "transformer over each token's attention history, trained "
                               "online", temporal.PARAMS),
        "expected_attention": MethodSpec(
            expected_attention.build, "Expected Attention: attention expected from a "
            "Gaussian of future queries (window mean + covariance, RoPE-averaged over "
            "future positions) times ||v||, per KV head (arXiv:2510.00636)",
            expected_attention.PARAMS),
        "minicache": MethodSpec(lambda c: minicache.MiniCache(c.args["minicache_start"],
                                                              c.args["minicache_retain_cos"]),
                                "MiniCache: merge adjacent deep layers' KV (research "
                                "path only; arXiv:2405.14366)", minicache.PARAMS,
                                servable=False),
        "adaptive": MethodSpec(
            adaptive.build, "per request and layer, the candidate scorer (adaptive_scorers) "
            "whose top tokens caught most of the held-out window queries' attention "
            "(running average); a selection among the scorers above", adaptive.PARAMS,
            nested=adaptive.CANDIDATES),
    }


@functools.cache
def _framework_params() -> dict[str, Param]:
    """Parameters of every method, declared by the framework pieces that read them."""
    from vllm_kvshrink.methods import budgets
    from vllm_kvshrink.methods.params import PROMOTION

    return gather(budgets.PARAMS, PROMOTION)


def _semantic_params() -> Mapping[str, Param]:
    from vllm_kvshrink.methods import semantic

    return semantic.PARAMS


@functools.cache
def param_table() -> Mapping[str, Param]:
    """name -> :class:`Param` of every method parameter: the methods'
    declarations (registry order, then semantic's), then the framework's.
    Flat names, unique across methods (:func:`~vllm_kvshrink.methods.params.gather`)."""
    from types import MappingProxyType

    return MappingProxyType(gather(*(s.params for s in _registry().values()),
                                   _semantic_params(), _framework_params()))


def _spec_params(spec: MethodSpec) -> tuple[str, ...]:
    """A method's own parameters, then those of the methods it nests."""
    nested = (k for n in spec.nested for k in _registry()[n].params)
    return tuple(dict.fromkeys((*spec.params, *nested)))


def adaptive_candidates() -> list[str]:
    from vllm_kvshrink.methods.adaptive import CANDIDATES, EXCLUDED

    return [n for n in _registry() if n not in EXCLUDED and n in CANDIDATES]


_SEMANTIC_DOC = ("SemanticAwareCompressor: evicted tokens merged into similar kept "
                 "ones (learned key embedding); '<method>+semantic' composes it")


#: Not composable with ``+semantic``: no scorer, cross-layer merging, or
#: (adaptive) nested candidates whose ``online`` would clash with semantic's.
_NOT_COMPOSABLE = ("none", "minicache", "adaptive")


def base_names() -> list[str]:
    return list(_registry())


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
    if base not in _registry() or (plus and base in _NOT_COMPOSABLE):
        raise ValueError(f"unknown method {name!r}")
    return base, bool(plus)


def method_params(name: str) -> tuple[str, ...]:
    """Every parameter ``name`` accepts, in the order errors list them."""
    base, merges = parse_method(name)
    own = _spec_params(_registry()[base]) + tuple(_framework_params())
    return tuple(dict.fromkeys(own + (tuple(_semantic_params()) if merges else ())))


def is_servable(name: str) -> bool:
    base, _ = parse_method(name)
    return _registry()[base].servable


def resolve_args(name: str, given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Defaults filled in, types and ranges checked; ``ValueError`` naming
    ``where`` (the setting), the key, the value and what is allowed."""
    table = param_table()
    allowed = method_params(name)
    out = {k: table[k].default for k in allowed}
    for key, value in (given or {}).items():
        if key not in table:
            raise ValueError(f"{where} has unknown key {key!r}; allowed keys for "
                             f"method {name!r}: {', '.join(allowed)}")
        if key not in allowed:
            raise ValueError(f"{where} key {key!r} does not apply to method {name!r}; "
                             f"allowed keys: {', '.join(allowed)}")
        p = table[key]
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
    for name, spec in _registry().items():
        own = _spec_params(spec)
        params = f"  [args: {', '.join(own)}]" if own else ""
        lines.append(f"{name:<10} {spec.doc}{params}")
    lines.append(f"{'semantic':<10} {_SEMANTIC_DOC}  "
                 f"[args: {', '.join(_semantic_params())}]")
    combos = [n for n in available_methods() if n.endswith("+semantic")]
    lines.append(f"{'':<10} compositions: {', '.join(combos)}")
    lines.append("\nMethod arguments (VLLM_KVSHRINK_METHOD_ARGS, JSON):")
    for key, p in param_table().items():
        lines.append(f"  {key:<22} default {p.default!r}: {p.doc}")
    return "\n".join(lines)


def build_method(cfg):
    """The method object named by ``cfg.method`` (``None`` for 'none').

    ``cfg`` needs ``method``, ``pool_kernel`` and ``args`` (resolved method
    arguments, see :func:`resolve_args`).
    """
    base, merges = parse_method(cfg.method)
    spec = _registry()[base]
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
    "method_params",
    "param_table",
]
