"""Method parameters are declared next to their code (each module's
``PARAMS``) and gathered by the registry: the flat table users' JSON keys are
checked against must be exactly the union of those declarations, a name must
mean one parameter, and ``--list`` must document every parameter a method
accepts."""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil

import pytest

import vllm_kvshrink.methods as methods_pkg
from vllm_kvshrink.__main__ import main
from vllm_kvshrink.methods import (
    _registry,
    available_methods,
    base_names,
    describe_methods,
    method_params,
    param_table,
)
from vllm_kvshrink.methods.params import ONLINE_LEARNING, PROMOTION, Param, gather


def declarations() -> dict[str, dict[str, Param]]:
    """Every ``PARAMS`` table in the methods package, plus the framework's
    (promotion's) and the shared online-learning one."""
    out = {}
    for info in pkgutil.iter_modules(methods_pkg.__path__):
        mod = importlib.import_module(f"vllm_kvshrink.methods.{info.name}")
        if isinstance(getattr(mod, "PARAMS", None), dict):
            out[mod.__name__] = mod.PARAMS
    out["PROMOTION"] = PROMOTION
    out["ONLINE_LEARNING"] = ONLINE_LEARNING
    return out


def test_table_is_the_union_of_the_declarations():
    decl = declarations()
    owners: dict[str, set[int]] = {}
    for table in decl.values():
        for name, p in table.items():
            assert isinstance(p, Param), name
            owners.setdefault(name, set()).add(id(p))
    # One declaration per name: a name in several tables is a shared object.
    assert {n for n, ids in owners.items() if len(ids) > 1} == set()
    table = param_table()
    assert set(table) == set(owners)
    for t in decl.values():
        for name, p in t.items():
            assert table[name] is p
    # Names shared between tables are exactly the shared declaration's.
    seen: dict[str, int] = {}
    for modname, t in decl.items():
        if modname != "ONLINE_LEARNING":
            for name in t:
                seen[name] = seen.get(name, 0) + 1
    assert {n for n, c in seen.items() if c > 1} == set(ONLINE_LEARNING)


def test_registry_reads_each_methods_own_module():
    for name, spec in _registry().items():
        if spec.params:
            mod = importlib.import_module(f"vllm_kvshrink.methods.{name}")
            assert spec.params is mod.PARAMS, name


def test_gather_refuses_a_name_declared_twice():
    a = {"x": Param(int, 1, "a")}
    assert gather(a, a, {"y": Param(int, 2, "b")}).keys() == {"x", "y"}
    with pytest.raises(ValueError, match="'x' is declared twice"):
        gather(a, {"x": Param(int, 1, "a")})


def test_defaults_are_valid():
    for name, p in param_table().items():
        assert isinstance(p.default, p.kind), name
        assert p.check(p.default), name
        assert p.doc, name


def test_every_methods_parameters_are_documented():
    text = describe_methods()
    table = param_table()
    for method in available_methods():
        for key in method_params(method):
            p = table[key]
            assert f"  {key:<22} default {p.default!r}: {p.doc}" in text, (method, key)
    for name in base_names():
        own = _registry()[name].params
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{name} "))
        assert all(k in line for k in own), name
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--list"]) == 0
    assert text in out.getvalue()
