"""Run the test suite group by group and print each group's duration.

    python tests/run.py                 # every group, in the order below
    python tests/run.py engine serve    # some groups
    python tests/run.py unit -- -k bytes -x   # extra pytest arguments

Groups are folders of ``tests/`` sorted by what their tests need, cheapest
first.  Each runs in its own pytest process: the kernels group needs Triton's
interpreter switched on before anything imports Triton, which a process that
imported vLLM (the other groups) has already done.  Every group runs even
after one fails; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: name -> (what its tests need, extra environment)
GROUPS: dict[str, tuple[str, dict[str, str]]] = {
    "unit": ("no model: bookkeeping, config, storage forms, layouts", {}),
    "kernels": ("Triton's CPU interpreter and the C++ extension, no model",
                {"TRITON_INTERPRET": "1"}),
    "research": ("the default model in transformers (research path, evaluation)", {}),
    "engine": ("vLLM engines started in-process or forked", {}),
    "serve": ("`vllm serve` processes and the OpenAI API", {}),
}

_SUMMARY = re.compile(r"=+ (.*) in [\d.]+s")


def _run(group: str, extra: list[str]) -> tuple[int, float, str]:
    env = {**os.environ, **GROUPS[group][1]}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(TESTS / group), *extra]
    print(f"\n=== {group}: {GROUPS[group][0]}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=TESTS.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    summary = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = _SUMMARY.search(line)
        if m:
            summary = m.group(1)
    rc = proc.wait()
    return rc, time.perf_counter() - start, summary


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    unknown = [g for g in argv if g not in GROUPS]
    if unknown:
        print(f"unknown test group(s) {', '.join(unknown)}; allowed: {', '.join(GROUPS)}",
              file=sys.stderr)
        return 2
    groups = argv or list(GROUPS)
    rows = []
    total = time.perf_counter()
    for g in groups:
        rows.append((g, *_run(g, extra)))
    total = time.perf_counter() - total
    print("\n=== test groups")
    print(f"{'group':<10} {'seconds':>8}  result")
    for g, rc, secs, summary in rows:
        # pytest exits 5 when a selection matched no test: not a failure
        verdict = summary or ("no tests" if rc == 5 else f"exit {rc}")
        print(f"{g:<10} {secs:>8.0f}  {verdict}")
    print(f"{'all':<10} {total:>8.0f}  ({total / 60:.1f} min)")
    return 0 if all(rc in (0, 5) for _, rc, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
