"""Import hygiene of the package.

* No import circles among ``vllm_kvshrink`` modules.  The graph is read from
  the sources with :mod:`ast`: every ``import`` / ``from ... import`` of a
  ``vllm_kvshrink`` module, at module level or inside a function (a deferred
  import is still an edge: it runs when the function does), relative imports
  resolved; ``from pkg import name`` where ``name`` is a submodule imports the
  submodule; importing ``pkg.sub`` imports ``pkg/__init__`` too.
* The scheduler process imports neither Triton nor transformers: the modules
  vLLM's scheduler loads through the plugin (config, envs, compat, patches,
  core/, plan, policy/, metrics/) are imported in a fresh interpreter in
  which ``import triton`` and ``import transformers`` fail, and they must
  import (and page arithmetic must run) all the same.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "vllm_kvshrink"


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package."""
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """``name`` and the packages above it (importing ``a.b.c`` runs ``a`` and
    ``a.b`` first), those that are modules of the package."""
    return ({name} | _parents(name)) & modules.keys()


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that module ``name`` imports, anywhere in it."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PKG:
                    found |= _with_parents(alias.name, modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PKG:
                continue
            found |= _with_parents(target, modules)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found |= _with_parents(sub, modules)
    # A module's own packages are imported before it, whatever it imports:
    # naming them is no edge.
    return found - {name} - _parents(name)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_reader_sees_what_python_imports(tmp_path):
    graph = import_graph()
    quant = graph["vllm_kvshrink.kernels.quant"]
    assert "vllm_kvshrink.kernels.reference" in quant  # from pkg import submodule
    assert "vllm_kvshrink.kernels.triton_quant" in quant  # inside a function
    assert "vllm_kvshrink.kernels" not in quant  # its own package: no edge
    assert {"vllm_kvshrink.kernels.quant", "vllm_kvshrink.kernels"} <= \
        graph["vllm_kvshrink.storage.quantized"]  # a module and its package
    assert "vllm_kvshrink.storage.quantized" in graph["vllm_kvshrink.storage"]
    # relative imports, resolved from a module and from a package
    modules = _modules()
    mod = tmp_path / "mod.py"
    mod.write_text("from . import config\nfrom .kernels import quant\n"
                   "def f():\n    from .storage import paged\n")
    assert _imports("vllm_kvshrink.mod", mod, modules) == {
        "vllm_kvshrink.config", "vllm_kvshrink.kernels", "vllm_kvshrink.kernels.quant",
        "vllm_kvshrink.storage", "vllm_kvshrink.storage.paged"}
    (tmp_path / "pkg").mkdir()
    init = tmp_path / "pkg" / "__init__.py"
    init.write_text("from .kv_layout import stack_layers\nfrom ...kernels.quant import pack\n")
    assert _imports("vllm_kvshrink.serving.worker", init, modules) == {
        "vllm_kvshrink.serving.worker.kv_layout", "vllm_kvshrink.kernels", "vllm_kvshrink.kernels.quant"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _package(name: str, modules: dict[str, Path]) -> str:
    return name if modules[name].name == "__init__.py" else name.rsplit(".", 1)[0]


def test_no_cycles_between_subpackages():
    """The subpackages (kernels, storage, worker, ...) import each other in
    one direction only: a module of ``a`` importing one of ``b`` is an edge
    ``a -> b`` (modules directly in ``vllm_kvshrink`` are left out: every
    module is below that package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, deps in import_graph().items():
        a = _package(name, modules)
        for dep in deps:
            b = _package(dep, modules)
            if PKG not in (a, b) and not (a + ".").startswith(b + ".") \
                    and not (b + ".").startswith(a + "."):
                graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle)


#: command-line entry points, which may use the lab (the CLI's ``--model``
#: names the embedded assets; the demo runs engines side by side)
ENTRY_POINTS = (f"{PKG}.__main__", f"{PKG}.demo")


def test_serving_and_shared_modules_do_not_import_the_lab():
    """The serving package and what it shares with the research path
    (policy, methods, storage, kernels, config) never import the lab."""
    graph = import_graph()
    lab = [m for m in graph if m.startswith(f"{PKG}.lab")]
    assert any(m.startswith(f"{PKG}.serving") for m in graph)
    for name, deps in graph.items():
        if name in lab or name in ENTRY_POINTS:
            continue
        assert not deps & set(lab), f"{name} imports {sorted(deps & set(lab))}"


SCHEDULER_PROBE = textwrap.dedent("""
    import importlib.abc
    import os
    import sys

    # vLLM's own scheduler imports Triton and transformers (this CPU wheel
    # does): load what our scheduler-side modules import from vLLM first.
    import vllm
    import vllm.utils.math_utils
    import vllm.v1.core.sched.scheduler
    import vllm.v1.kv_cache_interface

    BLOCKED = ("triton", "transformers")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the scheduler must not import it")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Block())

    import vllm_kvshrink
    import vllm_kvshrink.serving.compat
    import vllm_kvshrink.config
    import vllm_kvshrink.serving.core.scheduler
    import vllm_kvshrink.envs
    import vllm_kvshrink.serving.metrics.counters
    import vllm_kvshrink.serving.metrics.loggers
    import vllm_kvshrink.serving.patches
    import vllm_kvshrink.serving.plan
    import vllm_kvshrink.policy.cadence
    import vllm_kvshrink.policy.checks
    import vllm_kvshrink.policy.nbytes
    from vllm_kvshrink.config import KVShrinkConfig
    from vllm_kvshrink.storage.geometry import TierGeometry
    from vllm_kvshrink.storage import get_form
    from vllm_kvshrink.storage.paged import pageable, paged_form

    # what the scheduler process computes: the settings, page capacities and
    # the bytes of every form
    os.environ.update(VLLM_KVSHRINK_METHOD="snapkv", VLLM_KVSHRINK_BUDGET="0.5",
                      VLLM_KVSHRINK_STORAGE="bf16,int4_tok_rot,int2_tok")
    cfg = KVShrinkConfig.from_env()
    cfg.check_servable()
    assert paged_form("int4_tok", 64, 16, 2).capacity == 4096 // (32 + 32 + 8)
    geometry = TierGeometry(2, 2, 64, 16, 2)
    assert geometry.capacity("int2_tok") > geometry.capacity("int4_tok_rot") > 16
    assert geometry.block_bound(cfg, 100_000) > 0
    assert pageable("int2_tok_rot") and not pageable("int4")
    for name in ("bf16", "int8", "int4_tok_rot", "k4v2_tok", "lr8_int2"):
        assert get_form(name).bytes_per_token(64) > 0
    print("KERNELS", ",".join(sorted(m for m in sys.modules
                                     if m.startswith("vllm_kvshrink.kernels"))))
    print("LOADED", ",".join(sorted(m for m in sys.modules
                                    if m.split(".")[0] in BLOCKED)) or "-")
    sys.stdout.flush()
    os._exit(0)  # Triton's bindings, dropped from sys.modules, complain at teardown
""")


def test_scheduler_modules_import_neither_triton_nor_transformers():
    """vLLM's scheduler imports Triton and transformers itself, so the probe
    loads those vLLM modules first, then drops ``triton*`` / ``transformers*``
    from ``sys.modules`` and blocks them with a meta-path finder: any import
    of either by the scheduler-side modules of the package (or what they
    import) raises ImportError and fails the probe."""
    proc = subprocess.run([sys.executable, "-c", SCHEDULER_PROBE], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "LOADED -" in proc.stdout, proc.stdout
    kernels = proc.stdout.split("KERNELS ")[1].split()[0].split(",")
    assert not [m for m in kernels if m.split(".")[-1].startswith("triton")], kernels
