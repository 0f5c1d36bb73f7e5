"""Start :mod:`engine_run` in a fresh process with its own plugin settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_QUIET = {"VLLM_LOGGING_LEVEL": "WARNING", "TQDM_DISABLE": "1"}


def run_engine(spec: dict, env: dict[str, str] | None = None, timeout: float = 1800,
               quiet: bool = True) -> dict:
    """Run ``spec`` in a subprocess; ``env`` adds/overrides variables.

    Every inherited ``VLLM_KVSHRINK_*`` variable is dropped first so each run
    gets exactly the settings it names.
    """
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_KVSHRINK_")}
    if "VLLM_KVSHRINK_CACHE_DIR" in os.environ:
        full["VLLM_KVSHRINK_CACHE_DIR"] = os.environ["VLLM_KVSHRINK_CACHE_DIR"]
    full.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if quiet:
        full.update(_QUIET)
    full.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp, "spec.json")
        out_path = Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_kvshrink.bench.engine_run", str(spec_path),
             str(out_path)],
            env=full, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(
                f"engine run failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}"
            )
        return json.loads(out_path.read_text())
