"""Method parameters: the keys of ``VLLM_KVSHRINK_METHOD_ARGS`` (and of a
request's ``method_args``).

Each method module declares the parameters it reads in a module-level
``PARAMS`` (name -> :class:`Param`), next to the code that reads them, so a
method's settings, defaults and checks are read and changed in one place.
Parameters of a framework piece every method runs through are declared with
that piece (``head_budget`` in :mod:`vllm_kvshrink.methods.budgets`,
promotion's ``offload`` and ``promote_margin``, read by
:mod:`vllm_kvshrink.lab.hf.offload`, in :data:`PROMOTION` here), and the two that
both learned methods read (temporal's predictor and semantic's key embedding)
in :data:`ONLINE_LEARNING` here.  The registry
(:mod:`vllm_kvshrink.methods`) joins the declarations with :func:`gather`.

Users pass the parameters as flat JSON keys, without naming the method, so a
name must mean one parameter across the whole plugin: :func:`gather` refuses
two different declarations under one name (a shared declaration, the same
:class:`Param` object, may appear in several methods' tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Param:
    kind: type
    default: Any
    doc: str
    check: Callable[[Any], bool] = lambda v: True
    allowed: str = ""
    research_only: bool = False  # the engine refuses a non-default value


def unit(v) -> bool:
    """Open unit interval, for decays and shares."""
    return 0.0 < v < 1.0


#: Online training of a learned component, shared by ``temporal`` (the
#: importance predictor) and ``semantic`` (the key embedding).
ONLINE_LEARNING: dict[str, Param] = {
    "online": Param(bool, True, "temporal / semantic: keep training during serving "
                    "(adaptive's temporal candidate: off unless given)"),
    "lr": Param(float, 1e-3, "temporal / semantic: AdamW learning rate",
                lambda v: 0 < v < 1, "0 < x < 1"),
}


def gather(*tables: Mapping[str, Param]) -> dict[str, Param]:
    """One flat table of ``tables``, in order; ``ValueError`` when a name is
    declared twice (two different :class:`Param` objects)."""
    out: dict[str, Param] = {}
    for table in tables:
        for name, param in table.items():
            if out.setdefault(name, param) is not param:
                raise ValueError(f"method parameter {name!r} is declared twice; "
                                 f"parameters are flat JSON keys, so names must be "
                                 f"unique across methods")
    return out


#: Promotion's parameters (read by :mod:`vllm_kvshrink.lab.hf.offload`, for every
#: method): promotion needs tiered storage (the config refuses ``offload``
#: without it) and runs in the research path only.  Declared here rather than
#: beside the research code so the registry never imports the research path.
PROMOTION = {
    "offload": Param(float, 0.0, "tiered storage: keep the originals of up to this "
                     "fraction of the sequence's tokens (per layer and KV head) outside "
                     "the budget and promote the ones the scorer expects to matter "
                     "(research path only; 0 = demotion for good)",
                     lambda v: 0.0 <= v <= 1.0, "0 <= x <= 1", research_only=True),
    "promote_margin": Param(float, 1.0, "promotion: an evicted token's score is "
                            "divided by this before it competes with resident ones "
                            "(research path only; 1 = none)",
                            lambda v: v >= 1.0, "x >= 1", research_only=True),
}
