"""Where the learned methods' weights come from, said out loud.

The temporal predictor and the semantic embedding start from shipped weights
trained on one model (SmolLM2-135M-Instruct), from a file the user names, or
from a seeded random init when nothing fits (another head_dim).  Serving
another model with them works -- they keep training online -- but it is not
what their figures were measured on, so every such component is logged once
and counted (``vllm:kvshrink_foreign_weights``).
"""

from __future__ import annotations

from pathlib import PurePath


def _name(model: str) -> str:
    return PurePath(str(model).rstrip("/")).name


def foreign_weights(model: str) -> list[str]:
    """One line per learned component in this process whose weights were not
    trained on ``model`` (a path or hub id; compared by its last part)."""
    from vllm_kvshrink.methods import semantic, temporal

    here = _name(model)
    out = []
    components = [("temporal predictor", p, getattr(p, "meta", {}))
                  for p in temporal._SHARED.values()]
    components += [(f"semantic embedding (head_dim {e.proj.shape[0]})", e,
                    getattr(e, "meta", {})) for e in semantic._SHARED.values()]
    for what, _, meta in components:
        source, trained_on = meta.get("source", ""), meta.get("model")
        if trained_on is None:
            out.append(f"{what}: {source or 'untrained'} (no weights trained on "
                       f"{here}); it learns online from this model's attention")
        elif _name(trained_on) != here:
            out.append(f"{what}: weights trained on {trained_on}, serving {here}; "
                       f"it keeps training online, but its measured figures are "
                       f"for {trained_on}")
    return out
