"""Start :mod:`engine_run` in a fresh process with its own plugin settings."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_QUIET = {"VLLM_LOGGING_LEVEL": "WARNING", "TQDM_DISABLE": "1"}


def plugin_free_env() -> dict[str, str]:
    """This process's environment without any ``VLLM_KVSHRINK_*`` setting but
    the cache folder, so a child gets exactly the plugin settings it names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_KVSHRINK_")}
    if "VLLM_KVSHRINK_CACHE_DIR" in os.environ:
        env["VLLM_KVSHRINK_CACHE_DIR"] = os.environ["VLLM_KVSHRINK_CACHE_DIR"]
    return env


def run_engine(spec: dict, env: dict[str, str] | None = None, timeout: float = 1800,
               quiet: bool = True) -> dict:
    """Run ``spec`` in a subprocess; ``env`` adds/overrides variables.

    Every inherited ``VLLM_KVSHRINK_*`` variable is dropped first so each run
    gets exactly the settings it names.
    """
    full = plugin_free_env()
    full.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if quiet:
        full.update(_QUIET)
    full.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp, "spec.json")
        out_path = Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        forkable = quiet and not spec.get("progress") and all(map(_forkable, env or {}))
        server = _fork_server(full) if forkable else None
        if server is not None:
            err_path = Path(tmp, "stderr.txt")
            rc = server.run(str(spec_path), str(out_path), str(err_path), full, timeout)
            tail = err_path.read_text(errors="replace")
        else:
            rc, tail = _run_fresh(spec, spec_path, out_path, full, timeout)
        if rc != 0 or not out_path.exists():
            raise RuntimeError(f"engine run failed (exit {rc}):\n" + tail[-8000:])
        return json.loads(out_path.read_text())


def _run_fresh(spec: dict, spec_path: Path, out_path: Path, env: dict[str, str],
               timeout: float) -> tuple[int, str]:
    """:mod:`engine_run` in a fresh interpreter: its exit code and the last
    lines of its stderr (progress lines are shown as they come)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_kvshrink.lab.bench.engine_run", str(spec_path),
         str(out_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    tail: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if spec.get("progress") and line.startswith("  step "):
                print(line, end="", file=sys.stderr, flush=True)
            tail.append(line)
            del tail[:-200]
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(tail)


#: Tests turn this on (conftest.py): engine runs are then forked from one
#: process that imported torch and vLLM once (:mod:`.forkserver`) instead of a
#: fresh interpreter each; benchmarks keep fresh interpreters.
FORK_SERVER = False
_SERVER = None


def _fork_server(base_env: dict[str, str]):
    """The fork server for runs that differ from ``base_env`` in plugin
    settings only (``None`` when off)."""
    global _SERVER
    if not FORK_SERVER:
        return None
    server_env = {k: v for k, v in base_env.items()
                  if not _forkable(k) and k not in _PER_CALL_ENV}
    if _SERVER is None or not _SERVER.alive() or _SERVER.env != server_env:
        from vllm_kvshrink.lab.bench.forkserver import ForkServer

        if _SERVER is not None:
            _SERVER.close()
        _SERVER = ForkServer(server_env)
        atexit.register(_SERVER.close)
    return _SERVER


#: vLLM variables read when an engine starts (not at import), which a forked
#: run may set itself, besides the plugin's own
_ENGINE_START_ENV = ("VLLM_PLUGINS", "VLLM_ENABLE_V1_MULTIPROCESSING",
                     "VLLM_CPU_OMP_THREADS_BIND")


def tp_thread_binding(tensor_parallel_size: int) -> dict[str, str]:
    """The environment a CPU engine with ``tensor_parallel_size`` ranks needs
    on this machine: vLLM binds each rank's threads to its own NUMA node and
    refuses to start with fewer nodes than ranks, so where there are fewer
    and ``VLLM_CPU_OMP_THREADS_BIND`` is not set already the ranks take this
    process's CPUs round-robin (``"0|1|0"`` for 3 ranks on 2 CPUs: ranks
    share cores, which makes absolute timings meaningless but ratios
    comparable).  ``{}`` for one rank."""
    if tensor_parallel_size <= 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return {}
    import glob

    if len(glob.glob("/sys/devices/system/node/node[0-9]*")) >= tensor_parallel_size:
        return {}  # vLLM's own binding, one node per rank
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= tensor_parallel_size:
        per = len(cpus) // tensor_parallel_size
        lists = [cpus[r * per:(r + 1) * per] for r in range(tensor_parallel_size)]
    else:
        lists = [[cpus[r % len(cpus)]] for r in range(tensor_parallel_size)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, c)) for c in lists)}


#: variables that change from call to call without bearing on the import
#: (pytest names the running test in one)
_PER_CALL_ENV = ("PYTEST_CURRENT_TEST",)


def _forkable(key: str) -> bool:
    return key.startswith("VLLM_KVSHRINK_") or key in _ENGINE_START_ENV


def run_side_by_side(spec: dict, configs: list[tuple[str, dict[str, str]]]) -> dict:
    """Run the same ``spec`` once per ``(name, env)``, one after the other,
    saying what runs and how long it took; ``{name: result}`` in order."""
    runs = {}
    for name, env in configs:
        print(f"running {name} ...", flush=True)
        t = time.perf_counter()
        runs[name] = run_engine(spec, env)
        print(f"  finished in {time.perf_counter() - t:.0f} s (engine start "
              f"{runs[name]['startup_s']:.0f} s)", flush=True)
    return runs
