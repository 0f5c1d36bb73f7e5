"""Engine runs forked from one process that imported torch and vLLM once.

Each engine run is its own process (the plugin's settings are per process),
and importing torch and vLLM is a large share of a short run's time (6 to 9 s
of about 14 s, measured on 2 cores).  :class:`ForkServer` keeps one process that has imported them and
forks a child per run; the child takes the run's environment and runs
:func:`vllm_kvshrink.lab.bench.engine_run.main` exactly as ``python -m`` would.
Nothing of the plugin is imported before the fork, so every child registers
the plugin from its own settings.  Children whose import-time settings differ
(logging) or that stream progress use a fresh interpreter instead
(:func:`vllm_kvshrink.lab.bench.launch.run_engine` decides).

Protocol (one JSON object per line): the client sends ``{"spec", "out",
"err", "env"}``; the server answers ``{"pid"}`` when the child starts and
``{"rc"}`` when it ends.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback


def _child(req: dict) -> int:
    devnull = os.open(os.devnull, os.O_RDWR)
    err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(err, 2)
    os.environ.clear()
    os.environ.update(req["env"])
    from vllm_kvshrink.lab.bench import engine_run

    try:
        rc = engine_run.main(["engine_run", req["spec"], req["out"]])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
        traceback.print_exc()
        rc = 1
    try:
        atexit._run_exitfuncs()  # vLLM's engine shutdown hooks
    finally:
        sys.stderr.flush()
    return rc


#: what a short engine run spends most of its time importing
PRELOAD = ("torch", "transformers", "vllm", "vllm.entrypoints.llm",
           "vllm.v1.engine.llm_engine", "vllm.v1.worker.cpu_worker")


def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(req))
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=out, flush=True)


class ForkServer:
    """The client: one server process, started on first use, runs one child
    at a time."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self._buf = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_kvshrink.lab.bench.forkserver"], env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            bufsize=0)
        if self._read(timeout=300).get("ready") is not True:
            raise RuntimeError("the engine fork server did not start")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, timeout: float) -> dict:
        """The next answer line; buffered here, not in a file object, so that
        ``select`` never waits on a line already read off the pipe."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the engine fork server exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, spec_path: str, out_path: str, err_path: str, env: dict[str, str],
            timeout: float) -> int:
        """Run one engine; returns its exit code (-9 when killed at ``timeout``)."""
        assert self.proc.stdin is not None
        req = {"spec": spec_path, "out": out_path, "err": err_path, "env": env}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = self._read(timeout=60)["pid"]
        try:
            return self._read(timeout=timeout)["rc"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            return self._read(timeout=60)["rc"]

    def close(self) -> None:
        if self.alive():
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    serve()
