"""Tests of vllm_kvshrink.serving.compat: supported versions and the vLLM seams."""

from __future__ import annotations

import pytest

from vllm_kvshrink.serving import compat
from vllm_kvshrink.serving.compat import Symbol
from vllm_kvshrink.envs import KVShrinkConfigError


def test_check_passes_on_installed_vllm():
    assert compat.check() == []
    compat.check_or_raise()


def test_installed_version_is_supported():
    v = compat.vllm_version()
    assert "0.32" in v
    compat.check_version()
    compat.check_version(v)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.31.99", "1.0.0", "0.4.3"])
def test_check_version_rejects(version):
    with pytest.raises(KVShrinkConfigError) as ei:
        compat.check_version(version)
    msg = str(ei.value)
    assert f"vLLM {version}" in msg
    assert compat.SUPPORTED in msg
    assert ">=0.32.0,<0.33" in msg
    assert "VLLM_KVSHRINK_METHOD=none" in msg


@pytest.mark.parametrize(
    "version", ["0.32.0", "0.32.1", "0.32.0+cpu", "0.32.1rc1", "0.32", "0.32.3.dev5+g1234"])
def test_check_version_accepts(version):
    compat.check_version(version)


def test_parse():
    assert compat._parse("0.32.1") == (0, 32, 1)
    assert compat._parse("0.32") == (0, 32, 0)
    assert compat._parse("0.32.0+cpu") == (0, 32, 0)
    assert compat._parse("0.32.1.dev5+g1234") == (0, 32, 1)


@pytest.mark.parametrize("version, expected", [
    ("0.33.0rc1", (0, 33, 0)), ("0.32.1rc10", (0, 32, 1)), ("0.32rc1", (0, 32, 0))])
def test_parse_pre_release(version, expected):
    assert compat._parse(version) == expected


def test_resolve():
    from vllm.v1.core.sched.scheduler import Scheduler

    assert compat.resolve("vllm.v1.core.sched.scheduler:Scheduler.schedule") is (
        Scheduler.schedule)


def test_every_symbol_path_is_well_formed():
    assert compat.SYMBOLS
    paths = [s.path for s in compat.SYMBOLS]
    assert len(paths) == len(set(paths))
    for s in compat.SYMBOLS:
        mod, sep, qual = s.path.partition(":")
        assert sep and mod.startswith("vllm") and qual


def test_missing_attribute_is_reported(monkeypatch):
    bad = "vllm.v1.core.sched.scheduler:Scheduler.no_such_method"
    monkeypatch.setattr(compat, "SYMBOLS", (
        Symbol("vllm.v1.core.sched.scheduler:Scheduler.schedule", ("self",)),
        Symbol(bad, ("self",)),
    ))
    problems = compat.check()
    assert len(problems) == 1
    assert problems[0].startswith(bad)
    assert "missing" in problems[0]
    with pytest.raises(KVShrinkConfigError) as ei:
        compat.check_or_raise()
    assert bad in str(ei.value)
    assert compat.SUPPORTED in str(ei.value)


def test_missing_module_is_reported(monkeypatch):
    bad = "vllm.no_such_module_kvshrink:Thing"
    monkeypatch.setattr(compat, "SYMBOLS", (Symbol(bad, None),))
    problems = compat.check()
    assert len(problems) == 1 and problems[0].startswith(bad)
    assert "missing" in problems[0]


def test_wrong_params_are_reported(monkeypatch):
    path = "vllm.v1.core.block_pool:BlockPool.free_blocks"
    monkeypatch.setattr(compat, "SYMBOLS", (
        Symbol(path, ("self", "blocks_renamed")),
        Symbol("vllm.v1.core.block_pool:BlockPool.get_new_blocks", ("self", "num_blocks")),
    ))
    problems = compat.check()
    assert len(problems) == 1
    assert path in problems[0]
    assert "blocks_renamed" in problems[0]
    assert "ordered_blocks" in problems[0]


def test_too_many_expected_params_are_reported(monkeypatch):
    path = "vllm.v1.core.block_pool:BlockPool.free_blocks"
    monkeypatch.setattr(compat, "SYMBOLS", (
        Symbol(path, ("self", "ordered_blocks", "a", "b", "c", "d", "e", "f")),))
    problems = compat.check()
    assert len(problems) == 1 and path in problems[0]


def test_not_callable_with_params_is_reported(monkeypatch):
    # a module-level constant has no signature
    path = "vllm_kvshrink.serving.compat:SUPPORTED"
    monkeypatch.setattr(compat, "SYMBOLS", (Symbol(path, ("x",)),))
    problems = compat.check()
    assert len(problems) == 1 and path in problems[0]
    assert "signature" in problems[0]


def test_every_overridden_scheduler_method_is_listed():
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_kvshrink.serving.core.scheduler import KVShrinkScheduler

    listed = {s.path for s in compat.SYMBOLS}
    overridden = [n for n, v in vars(KVShrinkScheduler).items()
                  if callable(v) and hasattr(Scheduler, n) and n != "__init__"]
    assert overridden, "the scheduler overrides nothing?"
    for name in overridden:
        assert f"vllm.v1.core.sched.scheduler:Scheduler.{name}" in listed, name


def test_patch_refuses_a_symbol_that_is_not_listed():
    class Owner:
        def f(self):
            return 1

    with pytest.raises(RuntimeError, match="not listed in vllm_kvshrink.serving.compat.SYMBOLS"):
        compat.patch(Owner, "f", lambda self: 2)
    assert Owner().f() == 1


def test_every_patch_site_goes_through_compat_patch():
    """No module of the plugin assigns to a vLLM class or module attribute
    except through compat.patch (the assignment pattern below)."""
    import re
    from pathlib import Path

    import vllm_kvshrink

    root = Path(vllm_kvshrink.__file__).parent
    pattern = re.compile(r"^\s*(\w+)\.(\w+)\s*=\s*[A-Za-z_]", re.M)
    offenders = []
    vllm_names = {"SchedulerConfig", "InputProcessor", "kv_cache_utils", "GPUModelRunner",
                  "MultiGroupBlockTable", "loggers", "Scheduler", "BlockPool",
                  "KVCacheManager", "CPUAttentionBackendImpl"}
    for path in root.rglob("*.py"):
        for m in pattern.finditer(path.read_text()):
            if m.group(1) in vllm_names and not m.group(2).startswith("_kvs"):
                offenders.append(f"{path.name}: {m.group(0).strip()}")
    assert offenders == []


def test_check_attributes_names_what_is_missing():
    from types import SimpleNamespace

    obj = SimpleNamespace(blocks=[], get_new_blocks=1, free_blocks=1,
                          get_num_free_blocks=1)
    with pytest.raises(KVShrinkConfigError) as ei:
        compat.check_attributes("block_pool", obj)
    assert "evict_blocks" in str(ei.value) and "VLLM_KVSHRINK_METHOD=none" in str(ei.value)
    obj.evict_blocks = 1
    compat.check_attributes("block_pool", obj)


def test_listed_patches_are_the_installed_ones():
    """After install (in a fresh process), every patched symbol resolves to the
    plugin's function and every one is listed."""
    import subprocess
    import sys

    from vllm_kvshrink.lab.bench.launch import plugin_free_env

    code = ("import vllm_kvshrink as k; k.register(); from vllm_kvshrink.serving import compat; "
            "print('\\n'.join(f'{p} {compat.resolve(p).__module__}' for p in compat.PATCHED))")
    env = plugin_free_env()
    env["VLLM_KVSHRINK_METHOD"] = "snapkv"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) >= 12, out.stdout
    listed = {s.path for s in compat.SYMBOLS}
    for path, module in rows:
        assert path in listed and module.startswith("vllm_kvshrink"), (path, module)
