"""``vllm serve`` as a subprocess on a loopback port, for the soak test, the
serving benchmark and the serve tests: start, wait for health, read
``/metrics``, stop cleanly."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> str:
    cmd = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    if not cmd:
        raise RuntimeError("the vllm console command is not installed (pip install -e .)")
    return cmd


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _samples(text: str):
    """Prometheus text -> ``(series and labels, value)`` of every sample line
    with a finite value."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        head, _, tail = line.rpartition(" ")
        try:
            value = float(tail)
        except ValueError:
            continue
        if head and math.isfinite(value):
            yield head, value


def parse_metrics(text: str, **labels: str) -> dict[str, float]:
    """Prometheus text -> {series name: value summed over its label sets};
    ``labels`` (e.g. ``finished_reason="length"``) keeps only the samples
    carrying them."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    out: dict[str, float] = {}
    for head, value in _samples(text):
        if want and not all(w in head for w in want):
            continue
        name = head.split("{", 1)[0].split(" ", 1)[0]
        out[name] = out.get(name, 0.0) + value
    return out


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """Prometheus text -> {value of ``label``: the series ``name`` summed
    over its other labels}, e.g. ``vllm:kvshrink_seconds_total`` per
    ``phase``."""
    out: dict[str, float] = {}
    key = re.compile(rf'[{{,]{re.escape(label)}="([^"]*)"')
    for head, value in _samples(text):
        found = key.search(head) if head.startswith(name + "{") else None
        if found is not None:
            out[found.group(1)] = out.get(found.group(1), 0.0) + value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus series over its label sets (0 when absent), or over
    those carrying ``labels``."""
    return parse_metrics(text, **labels).get(name, 0.0)


class Server:
    """``with Server(model, args, env, log) as s: s.url ...``

    ``env`` adds to the environment after every inherited ``VLLM_KVSHRINK_*``
    variable is dropped (except ``VLLM_KVSHRINK_CACHE_DIR``), so each server
    gets exactly the plugin settings it names."""

    def __init__(self, model: str, args: list[str], env: dict[str, str] | None,
                 log_path: str | os.PathLike, start_timeout: float = 600,
                 port: int = 0) -> None:
        self.model, self.args, self.log_path = model, list(args), Path(log_path)
        from vllm_kvshrink.lab.bench.launch import plugin_free_env

        self.env = plugin_free_env()
        self.env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # serve's default
        self.env.update(env or {})
        self.start_timeout = start_timeout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + 60  # a previous server may hold the port a moment
        while not port_free(self.port) and time.time() < deadline:
            time.sleep(1)
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:  # the child keeps its own handle
            # Its own session, so that stopping it stops the engine core too.
            self.proc = subprocess.Popen(
                [vllm_command(), "serve", self.model, "--port", str(self.port),
                 "--host", "127.0.0.1", *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}):\n"
                                   + self.log_tail())
            try:
                self.get("/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"vllm serve not healthy in {self.start_timeout:.0f}"
                                       f" s:\n" + self.log_tail())
                time.sleep(1)
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        """SIGTERM, wait; SIGKILL the process group (engine core too) if it
        does not end, or if the group outlives the API server."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                proc.wait(timeout=30)
        deadline = time.time() + 20
        while True:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            if time.time() > deadline:
                _killpg(proc.pid)
                return
            time.sleep(0.5)

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
